-- makima's read model and audit trail. Temporal holds the orchestration; these
-- tables are a projection of the events the workflows emit (makima.store.writes).
--
-- Projection rows have no foreign keys to each other because events may arrive
-- out of order (a step's attempt may be recorded before its step row); every row
-- references its directive, which the writer creates first in the same transaction.
-- Mutable columns remember the (source, seq) of the event that last set them so an
-- older event arriving late never overwrites a newer state.

CREATE TABLE directives (
    id                  text PRIMARY KEY,
    title               text NOT NULL DEFAULT '',
    owner               text NOT NULL DEFAULT '',
    status              text NOT NULL DEFAULT 'planning',
    reason              text NOT NULL DEFAULT '',
    generation          integer NOT NULL DEFAULT 1,
    cost_usd            double precision NOT NULL DEFAULT 0,
    breaker             text,
    integration_branch  text NOT NULL DEFAULT '',
    spec                jsonb,
    created_at          timestamptz,               -- the directive_started event's time
    updated_at          timestamptz,               -- the newest status event's time
    status_seq          bigint NOT NULL DEFAULT 0, -- seq of the directive event that set status
    last_position       bigint NOT NULL DEFAULT 0  -- events.position counter; its row lock orders writers
);
CREATE INDEX directives_status_idx ON directives (status, created_at DESC);
CREATE INDEX directives_owner_idx ON directives (owner, created_at DESC);
CREATE INDEX directives_created_idx ON directives (created_at DESC);

-- One row per generation (the first plan and every re-plan).
CREATE TABLE chains (
    directive_id  text NOT NULL REFERENCES directives (id) ON DELETE CASCADE,
    generation    integer NOT NULL,
    reason        text NOT NULL DEFAULT '',
    started_at    timestamptz,
    plan_status   text NOT NULL DEFAULT 'planning',  -- planning | ready | invalid | failed
    plan          jsonb,
    errors        jsonb NOT NULL DEFAULT '[]',
    plan_seq      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (directive_id, generation)
);

CREATE TABLE steps (
    directive_id  text NOT NULL REFERENCES directives (id) ON DELETE CASCADE,
    generation    integer NOT NULL,
    name          text NOT NULL,
    status        text NOT NULL DEFAULT 'pending',
    attempts      integer NOT NULL DEFAULT 0,
    score         double precision,
    confidence    text,
    depends_on    jsonb NOT NULL DEFAULT '[]',
    description   text NOT NULL DEFAULT '',
    summary       text NOT NULL DEFAULT '',
    reason        text NOT NULL DEFAULT '',
    workflow_id   text,
    updated_at    timestamptz,
    status_seq    bigint NOT NULL DEFAULT 0,  -- only the directive workflow sets step status
    PRIMARY KEY (directive_id, generation, name)
);

CREATE TABLE attempts (
    directive_id      text NOT NULL REFERENCES directives (id) ON DELETE CASCADE,
    generation        integer NOT NULL,
    step              text NOT NULL,
    attempt           integer NOT NULL,
    workflow_id       text,
    rework            jsonb,
    started_at        timestamptz,
    finished_at       timestamptz,
    success           boolean,
    exit_code         integer,
    branch            text,
    commit            text,
    summary           text NOT NULL DEFAULT '',
    duration_seconds  double precision,
    cost_usd          double precision NOT NULL DEFAULT 0,
    execution         jsonb,  -- the whole ExecuteOutput
    PRIMARY KEY (directive_id, generation, step, attempt)
);

CREATE TABLE evaluations (
    directive_id         text NOT NULL REFERENCES directives (id) ON DELETE CASCADE,
    generation           integer NOT NULL,
    step                 text NOT NULL,
    attempt              integer NOT NULL,
    passed               boolean NOT NULL,
    score                double precision NOT NULL,
    confidence           text NOT NULL,
    summary              text NOT NULL DEFAULT '',
    rework_instructions  text NOT NULL DEFAULT '',
    evaluator            text NOT NULL DEFAULT '',
    criteria             jsonb NOT NULL DEFAULT '[]',  -- CriterionResult[]
    checks               jsonb NOT NULL DEFAULT '[]',  -- CheckResult[] (programmatic results)
    cost_usd             double precision NOT NULL DEFAULT 0,
    evaluated_at         timestamptz NOT NULL,
    PRIMARY KEY (directive_id, generation, step, attempt)
);

CREATE TABLE approvals (
    directive_id  text NOT NULL REFERENCES directives (id) ON DELETE CASCADE,
    generation    integer NOT NULL,
    step          text NOT NULL,
    attempt       integer NOT NULL,
    score         double precision,
    summary       text NOT NULL DEFAULT '',
    requested_at  timestamptz,
    decided_at    timestamptz,
    approved      boolean,
    decided_by    text,
    comment       text NOT NULL DEFAULT '',
    PRIMARY KEY (directive_id, generation, step, attempt)
);
CREATE INDEX approvals_pending_idx ON approvals (directive_id) WHERE decided_at IS NULL;

-- The append-only audit trail. (source, seq) is the natural key the workflows
-- assign; position is assigned here, per directive, under the directive row's lock,
-- so positions are gap-free and commit in order (what `watch` relies on).
CREATE TABLE events (
    source        text NOT NULL,
    seq           bigint NOT NULL,
    directive_id  text NOT NULL REFERENCES directives (id) ON DELETE CASCADE,
    position      bigint NOT NULL,
    generation    integer NOT NULL,
    step          text,
    attempt       integer,
    type          text NOT NULL,
    severity      text NOT NULL,
    actor         text NOT NULL,
    message       text NOT NULL DEFAULT '',
    data          jsonb NOT NULL DEFAULT '{}',
    at            timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, seq),
    UNIQUE (directive_id, position)
);
CREATE INDEX events_step_idx ON events (directive_id, generation, step);
