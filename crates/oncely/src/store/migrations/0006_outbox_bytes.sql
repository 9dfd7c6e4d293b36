-- Outbox header names as bytes, and rows the relay sets aside.
--
-- Kafka header names are bytes on the wire (a dead-letter copy carries the
-- original record's headers as they came, which may not be UTF-8 or may hold
-- NUL, which `text` refuses). `header_keys` becomes `bytea[]`; existing names
-- are converted to their UTF-8 bytes, which is what the relay sent for them.
-- `header_values` may now hold NULL elements: a header with a null value,
-- which Kafka distinguishes from an empty one.
--
-- ALTER COLUMN ... TYPE rewrites the table under an ACCESS EXCLUSIVE lock:
-- with many published rows kept by retention, run `oncely migrate` when a
-- pause of the outbox is acceptable.

-- USING cannot hold a subquery, so the conversion is a function, dropped
-- once it has served.
CREATE FUNCTION oncely.outbox_header_keys_to_bytes(keys text[]) RETURNS bytea[]
    LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT coalesce(array_agg(convert_to(k, 'UTF8') ORDER BY i), '{}'::bytea[])
      FROM unnest(keys) WITH ORDINALITY AS t(k, i)
$$;

ALTER TABLE oncely.outbox
    ALTER COLUMN header_keys DROP DEFAULT,
    ALTER COLUMN header_keys TYPE bytea[] USING oncely.outbox_header_keys_to_bytes(header_keys),
    ALTER COLUMN header_keys SET DEFAULT '{}';

DROP FUNCTION oncely.outbox_header_keys_to_bytes(text[]);

-- A row the broker refuses for good (larger than the topic's
-- `max.message.bytes`, an invalid record, the topic missing or not
-- authorised) is set aside by the relay: `failed_at` and `last_error` say
-- when and why. It is no longer claimed, and the later rows of its key
-- (same topic and key) are held behind it, so they never overtake it; rows
-- of other keys go on. An operator sends it back (`oncely outbox retry`,
-- failed_at cleared) once the cause is fixed, or gives it up
-- (`oncely outbox discard`, discarded_at set), which releases its key.
-- Retention removes discarded rows like published ones.
ALTER TABLE oncely.outbox
    ADD COLUMN failed_at    timestamptz,
    ADD COLUMN discarded_at timestamptz;

-- The claim's hold check and the status views: rows set aside and not given
-- up (normally none). Only (lane, id): a key may be too large for an index row.
CREATE INDEX outbox_failed ON oncely.outbox (lane, id)
    WHERE failed_at IS NOT NULL AND discarded_at IS NULL AND published_at IS NULL;
-- Retention of discarded rows.
CREATE INDEX outbox_discarded ON oncely.outbox (discarded_at) WHERE discarded_at IS NOT NULL;
