-- Webhooks: tenants' endpoints and signing secrets (configuration), and the delivery side
-- of the outbox: one message per (endpoint, alert fact), its attempts, and the fan-out
-- progress over `alert_facts`. None of this is the ledger record: alert facts are, and stay
-- append-only; these tables are the dispatcher's working state.

create table webhook_endpoints (
  id uuid primary key,
  tenant_id text collate "C" not null references tenants (id),
  url text not null,
  description text not null default '',
  -- the alert types delivered; empty: every type
  event_types text[] not null default '{}',
  enabled boolean not null default true,
  -- why it was disabled: 'operator', 'gone' (the receiver answered 410), 'failing'
  disabled_reason text,
  disabled_at timestamptz,
  -- first failed attempt since the last success
  failing_since timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index webhook_endpoints_tenant on webhook_endpoints (tenant_id, created_at);

-- signing secrets; `expires_at` null is the current one, a rotated-out one stays valid (and
-- is signed with too) until it expires
create table webhook_secrets (
  endpoint_id uuid not null references webhook_endpoints (id) on delete cascade,
  secret text not null,
  created_at timestamptz not null default clock_timestamp(),
  expires_at timestamptz,
  primary key (endpoint_id, created_at)
);

create table webhook_messages (
  -- the `webhook-id`: the same for every attempt
  id text primary key,
  tenant_id text collate "C" not null,
  endpoint_id uuid not null references webhook_endpoints (id) on delete cascade,
  -- null for test events
  alert_fact_id bigint,
  type text collate "C" not null,
  -- exactly the bytes signed and sent, fixed when the message is made
  body text not null,
  status text collate "C" not null check (status in ('pending', 'succeeded', 'failed')),
  -- attempts made so far (numbers attempts), and the position in the retry schedule (a
  -- replay starts the schedule again)
  attempts int not null default 0,
  schedule_pos int not null default 0,
  next_attempt_at timestamptz not null,
  last_status int,
  last_error text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  unique (endpoint_id, alert_fact_id)
);
create index webhook_messages_due on webhook_messages (next_attempt_at) where status = 'pending';
create index webhook_messages_endpoint on webhook_messages (endpoint_id, created_at);
create index webhook_messages_tenant on webhook_messages (tenant_id, created_at);

create table webhook_attempts (
  message_id text not null references webhook_messages (id) on delete cascade,
  -- numbered per message; the key makes a second delivery of one attempt impossible
  attempt int not null,
  endpoint_id uuid not null,
  url text not null,
  started_at timestamptz not null,
  latency_ms int not null,
  -- null: no response (refused address, connection error, timeout)
  status_code int,
  error text,
  -- the first 1 KiB of the response body
  response_body text,
  primary key (message_id, attempt)
);

-- alert facts at or below `low_id` are fanned out; above it, `webhook_fanout` marks those done
create table webhook_cursor (
  id int primary key check (id = 1),
  low_id bigint not null
);
insert into webhook_cursor values (1, 0);
create table webhook_fanout (
  alert_fact_id bigint primary key
);

grant select, insert, update, delete on webhook_endpoints, webhook_secrets, webhook_messages,
  webhook_attempts, webhook_fanout to tokenledger_app;
grant select, update on webhook_cursor to tokenledger_app;

-- commitment drawdown alert thresholds (percent of the amount)
alter table commitments add column alert_thresholds numeric[] not null default '{50,80}';

-- reservation under-utilisation alerts: below this share of capacity over the last day
alter table reservations add column underutilization_alert_percent numeric
  check (underutilization_alert_percent > 0 and underutilization_alert_percent <= 100);
