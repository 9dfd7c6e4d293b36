-- Transactional outbox: events written in the application's own transaction
-- (crate::outbox::enqueue), published to Kafka by the relay
-- (crate::outbox::relay). Every statement on this table is in
-- crates/oncely/src/store/outbox.rs.
--
-- `lane` is a stable hash of the Kafka key, computed at enqueue time
-- (crate::outbox::lane_of). Each lane is published by one relay at a time,
-- which holds the session-level advisory lock (LANE_LOCK_NS, lane) on a
-- dedicated connection; so the rows of one key are published by one relay in
-- id order.
--
-- There is no "last published id" anywhere: a bigserial id is taken when the
-- row is inserted, not when its transaction commits, so a lower id can become
-- visible after a higher one has been published. The relay always selects the
-- unpublished rows of its lanes (`published_at IS NULL`) in id order, which
-- finds such a late row on its next pass.
CREATE TABLE oncely.outbox (
    id            bigserial   PRIMARY KEY,
    lane          smallint    NOT NULL,
    topic         text        NOT NULL,
    key           bytea,
    payload       bytea,
    header_keys   text[]      NOT NULL DEFAULT '{}',
    header_values bytea[]     NOT NULL DEFAULT '{}',
    -- The CloudEvents id, when the record has one (for operators: "was event X
    -- published?"); the relay sends the headers, not this column.
    ce_id         text,
    -- clock_timestamp(): the time of the insert, not of the start of a long
    -- transaction. Sent as the Kafka record timestamp.
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at  timestamptz,
    -- Failed publish attempts and the last error, for `oncely outbox status`.
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text
);

-- The relay's claim: unpublished rows in id order.
CREATE INDEX outbox_pending ON oncely.outbox (id) WHERE published_at IS NULL;
-- Retention and the publish rate.
CREATE INDEX outbox_published ON oncely.outbox (published_at) WHERE published_at IS NOT NULL;

-- Wakes the relays (LISTEN oncely_outbox) when rows are enqueued. Statement
-- level, and PostgreSQL folds identical notifications of one transaction into
-- one, so a transaction that enqueues many rows sends one notification, at
-- commit. The relays also poll, so a lost notification only delays.
CREATE FUNCTION oncely.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('oncely_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON oncely.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION oncely.outbox_notify();
