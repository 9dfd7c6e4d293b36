-- Projection rebuilds (`oncely::projection`, `oncely projection ...`): one row
-- per rebuild target. Every statement that reads or writes it lives in
-- crates/oncely/src/store/projection.rs.
--
-- A rebuild runs the live consumer's handler over the topic into the schema
-- named `target`, as the consumer `rebuild_consumer` (its own inbox, offsets,
-- entity versions and dead letters). A swap exchanges, in one transaction,
-- the projection's tables between `live_schema` and `target`, and the
-- positions, inbox and entity versions between `consumer` and
-- `rebuild_consumer`: after it, `target` holds the previous projection (kept
-- for swap-back, which is the same exchange again).
CREATE TABLE oncely.projection_rebuilds (
    target            text        PRIMARY KEY,
    projection        text        NOT NULL,
    consumer          text        NOT NULL,
    rebuild_consumer  text        NOT NULL UNIQUE,
    live_schema       text        NOT NULL,
    tables            text[]      NOT NULL,
    -- Columns left out of the diff's checksums (timestamps, who wrote a row).
    diff_ignore       text[]      NOT NULL DEFAULT '{}',
    -- What the rebuild was started from: 'earliest' or an RFC 3339 time.
    from_spec         text        NOT NULL,
    -- 'rebuilding': the target holds the rebuild, which may run and follow;
    -- 'swapped': the target holds the previous live projection (swap-back
    -- possible until keep_until); the rebuild does not run.
    state             text        NOT NULL DEFAULT 'rebuilding'
                      CHECK (state IN ('rebuilding', 'swapped')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- The last diff (live vs target), required before a swap unless overridden.
    diffed_at         timestamptz,
    diff              jsonb,
    swapped_at        timestamptz,
    keep_until        timestamptz,
    swap_audit_id     bigint,
    swaps             integer     NOT NULL DEFAULT 0
);
CREATE INDEX projection_rebuilds_consumer ON oncely.projection_rebuilds (consumer);
