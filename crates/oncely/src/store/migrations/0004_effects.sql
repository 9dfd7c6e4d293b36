-- Side effects: an intent per (consumer, effect, event identity), recorded in
-- the handler's transaction and run after commit by the executor.
CREATE TABLE oncely.effects (
    key             text        PRIMARY KEY,       -- <consumer>/<effect>/<event identity>[/<suffix>]
    consumer        text        NOT NULL,
    effect          text        NOT NULL,
    event_id        text        NOT NULL,
    payload         jsonb       NOT NULL,
    semantics       text        NOT NULL CHECK (semantics IN ('at_least_once', 'at_most_once')),
    -- pending: due at next_attempt_at; running: an executor holds it until lease_until;
    -- done / failed / dead: finished; unknown: an at-most-once call was
    -- interrupted and waits for an operator; suppressed: recorded in replay mode, never run.
    status          text        NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'dead', 'unknown', 'suppressed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    ordering_key    text,                           -- effect + entity, when order is asked for
    seq             bigserial,
    result          jsonb,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE INDEX effects_due ON oncely.effects (next_attempt_at) WHERE status = 'pending';
CREATE INDEX effects_running ON oncely.effects (lease_until) WHERE status = 'running';
CREATE INDEX effects_ordering ON oncely.effects (ordering_key, seq) WHERE ordering_key IS NOT NULL;
CREATE INDEX effects_consumer_status ON oncely.effects (consumer, status);
