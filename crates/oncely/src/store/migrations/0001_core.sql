-- oncely core: the inbox, the consumer offsets, the version guard and the
-- dead-letter index. Every statement that reads or writes these tables lives in
-- crates/oncely/src/store/.

-- Inbox: one row per event identity a consumer has applied. Range-partitioned
-- by the UTC day the row was written, so retention drops whole partitions
-- (no long DELETE, no vacuum debt). The primary key must contain the partition
-- key, so it cannot alone stop a duplicate that arrives on a later day: the
-- claim statement also checks every live partition (see store::claim).
-- COLLATE "C": identities are compared byte by byte (memcmp), not with the
-- database's locale (strcoll is several times slower on every index probe).
CREATE TABLE oncely.inbox (
    consumer     text        COLLATE "C" NOT NULL,
    event_id     text        COLLATE "C" NOT NULL,
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    received_on  date        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id, received_on)
) PARTITION BY RANGE (received_on);

-- Creates the daily partitions from `from_day` for `days` days; idempotent.
CREATE FUNCTION oncely.ensure_inbox_partitions(from_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    created integer := 0;
    name text;
BEGIN
    -- Consumers starting together must not race on CREATE TABLE.
    PERFORM pg_advisory_xact_lock(7310582039163001);
    FOR i IN 0 .. days - 1 LOOP
        d := from_day + i;
        name := 'inbox_p' || to_char(d, 'YYYYMMDD');
        IF to_regclass('oncely.' || name) IS NULL THEN
            EXECUTE format('CREATE TABLE IF NOT EXISTS oncely.%I PARTITION OF oncely.inbox FOR VALUES FROM (%L) TO (%L)',
                           name, d, d + 1);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;

SELECT oncely.ensure_inbox_partitions(((now() AT TIME ZONE 'UTC')::date) - 1, 4);

-- Where each consumer is, per partition: the source of truth. Kafka's committed
-- offset is a copy for lag tools. Every batch advances it with a
-- compare-and-set on next_offset, which fences zombie consumers.
CREATE TABLE oncely.offsets (
    consumer     text        NOT NULL,
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    next_offset  bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);

-- Consumers known to this database, with their inbox retention: expired inbox
-- partitions are dropped only when every consumer's retention has passed.
CREATE TABLE oncely.consumers (
    name                 text        PRIMARY KEY,
    inbox_retention_days integer     NOT NULL,
    started_at           timestamptz NOT NULL DEFAULT now()
);

-- Version guard: the newest version applied per entity.
CREATE TABLE oncely.entity_versions (
    consumer     text        NOT NULL,
    entity_type  text        NOT NULL,
    entity_id    text        NOT NULL,
    version      bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, entity_type, entity_id)
);

-- Dead letters: the record as received, why it failed, and its redrive history.
CREATE TABLE oncely.dead_letters (
    id              bigserial   PRIMARY KEY,
    consumer        text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    record_ts_ms    bigint,
    event_id        text,
    key             bytea,
    payload         bytea,
    header_keys     text[]      NOT NULL DEFAULT '{}',
    header_values   bytea[]     NOT NULL DEFAULT '{}',
    reason          text        NOT NULL,
    error           text        NOT NULL,
    error_class     text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    redriven_at     timestamptz,
    redrive_count   integer     NOT NULL DEFAULT 0,
    UNIQUE (consumer, topic, partition, "offset")
);
CREATE INDEX dead_letters_consumer_created ON oncely.dead_letters (consumer, created_at);
