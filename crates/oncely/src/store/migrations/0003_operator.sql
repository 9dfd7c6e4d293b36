-- Operator tools: the audit log of operator actions and the snapshots of
-- consumer group offsets that make offset changes undoable. Every statement
-- that reads or writes these tables lives in crates/oncely/src/store/admin.rs.

-- One row per operator action (`oncely offsets reset`, `oncely dlq redrive`,
-- `oncely effects resolve`, ...), written BEFORE the action runs (result
-- 'started') and updated with its outcome, so a crash mid-action still leaves
-- a trace of who started what.
CREATE TABLE oncely.audit_log (
    id            bigserial   PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    -- Who: the OS user and the host the command ran on.
    os_user       text        NOT NULL,
    host          text        NOT NULL,
    -- Where: the oncely.toml environment and the live Kafka cluster id.
    environment   text        NOT NULL,
    cluster_id    text,
    -- What: the full command line, a dotted action name
    -- ('offsets.reset', 'offsets.undo', 'dlq.redrive', ...) and the consumer
    -- group (= oncely consumer name) it concerns, if any.
    command_line  text        NOT NULL,
    action        text        NOT NULL,
    group_id      text,
    -- State before and after (for offset actions: [{topic, partition,
    -- offset, metadata}]), and anything else the action wants to keep.
    before        jsonb,
    after         jsonb,
    details       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    result        text        NOT NULL DEFAULT 'started'
                  CHECK (result IN ('started', 'succeeded', 'failed', 'refused')),
    error         text
);
CREATE INDEX audit_log_started_at ON oncely.audit_log (started_at);
CREATE INDEX audit_log_group ON oncely.audit_log (group_id, id);

-- A consumer group's committed offsets at one moment: written by `oncely
-- watch` every 30 s, by `oncely offsets snapshot`, and before every offset
-- change (with the audit row of that change), so that "where were we at
-- 02:44?" always has an answer and every change can be undone.
CREATE TABLE oncely.offset_snapshots (
    id            bigserial   PRIMARY KEY,
    taken_at      timestamptz NOT NULL DEFAULT now(),
    environment   text        NOT NULL,
    -- Offsets mean nothing on another cluster: restores check this.
    cluster_id    text        NOT NULL,
    group_id      text        NOT NULL,
    reason        text        NOT NULL CHECK (reason IN ('watch', 'manual', 'before-change')),
    audit_id      bigint      REFERENCES oncely.audit_log (id),
    -- [{topic, partition, offset, metadata, log_end}]
    offsets       jsonb       NOT NULL
);
CREATE INDEX offset_snapshots_group ON oncely.offset_snapshots (cluster_id, group_id, taken_at);
CREATE INDEX offset_snapshots_audit ON oncely.offset_snapshots (audit_id) WHERE audit_id IS NOT NULL;
CREATE INDEX offset_snapshots_watch_taken_at ON oncely.offset_snapshots (taken_at) WHERE reason = 'watch';
