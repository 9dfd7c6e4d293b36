-- Failure path: events parked per key. A transiently failing event is parked
-- in the transaction that advances the offset past it; every later event of
-- the same key in that partition is parked behind it, so per-key order holds
-- while other keys go on. The head (lowest offset) of a key is retried with
-- backoff; when it succeeds the rest drain in order.
CREATE TABLE oncely.parked (
    consumer        text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    entity_key      text        NOT NULL,
    event_id        text,
    record_ts_ms    bigint,
    key             bytea,
    payload         bytea,
    header_keys     text[]      NOT NULL DEFAULT '{}',
    header_values   bytea[]     NOT NULL DEFAULT '{}',
    -- waiting: will be retried (the head) or drained (behind the head);
    -- held: behind a dead-lettered head under the `hold` policy, until released.
    status          text        NOT NULL DEFAULT 'waiting' CHECK (status IN ('waiting', 'held')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    error_class     text,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition, "offset")
);
CREATE INDEX parked_key ON oncely.parked (consumer, topic, partition, entity_key, "offset");
CREATE INDEX parked_due ON oncely.parked (consumer, topic, partition, next_attempt_at) WHERE status = 'waiting';
