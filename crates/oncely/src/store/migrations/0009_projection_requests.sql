-- Rebuilds asked for by an operator (`oncely projection rebuild`), for the
-- application to run: the operator's command line cannot run the
-- application's handler. An application that serves its projection
-- (`Projection::serve`) claims the requests for its consumer and runs them;
-- the rebuild's own row (oncely.projection_rebuilds) appears when it starts.
-- Every statement that reads or writes it lives in
-- crates/oncely/src/store/projection.rs.
CREATE TABLE oncely.projection_requests (
    target        text        PRIMARY KEY,
    consumer      text        NOT NULL,
    -- 'earliest', an RFC 3339 time, or 'snapshot:<id>'.
    from_spec     text        NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    -- The audit record of the request.
    audit_id      bigint
);
CREATE INDEX projection_requests_consumer ON oncely.projection_requests (consumer);
