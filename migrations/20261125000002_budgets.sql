-- Budgets (commercial terms, immutable and effective-dated), the generic alert-fact
-- table (the webhook outbox), and budget spend (a projection).

create table budgets (
  id bigserial primary key,
  tenant_id text collate "C" not null references tenants (id),
  -- versions of one budget share its name; the latest effective at an instant applies
  name text collate "C" not null check (name ~ '^[A-Za-z0-9._-]{1,64}$'),
  effective_from timestamptz not null,
  -- false: this version retires the budget
  active boolean not null default true,
  scope text collate "C" not null check (scope in ('tenant', 'api_key', 'tag')),
  scope_value text collate "C" not null default '',
  period text collate "C" not null check (period in ('day', 'week', 'month')),
  amount numeric not null check (amount > 0),
  thresholds numeric[] not null,
  action text collate "C" not null check (action in ('alert', 'block', 'downgrade')),
  downgrade_class text collate "C",
  created_at timestamptz not null default now()
);
create index budgets_tenant on budgets (tenant_id, name, effective_from);
create trigger budgets_no_update before update or delete on budgets
  for each row execute function refuse_change();
create trigger budgets_no_truncate before truncate on budgets
  for each statement execute function refuse_change();

-- Every alert the ledger decides, recorded once per (tenant, type, unique key): budget
-- threshold crossings now, other alert types later. Append-only; the webhook dispatcher
-- delivers from here.
create table alert_facts (
  id bigserial primary key,
  tenant_id text collate "C" not null,
  type text collate "C" not null,
  unique_key text collate "C" not null,
  payload jsonb not null,
  -- the instant of the event that caused it (ledger time, not the wall clock)
  occurred_at timestamptz not null,
  recorded_at timestamptz not null default now(),
  unique (tenant_id, type, unique_key)
);
create trigger alert_facts_no_update before update or delete on alert_facts
  for each row execute function refuse_change();
create trigger alert_facts_no_truncate before truncate on alert_facts
  for each statement execute function refuse_change();

-- Projection: spend per budget name and period, from the `budgets` part of the stored
-- breakdowns.
create table budget_spend (
  tenant_id text collate "C" not null,
  budget text collate "C" not null,
  period text collate "C" not null,
  spent numeric not null,
  primary key (tenant_id, budget, period)
) with (fillfactor = 50);

grant select, insert on budgets, alert_facts to tokenledger_app;
grant usage, select on sequence budgets_id_seq, alert_facts_id_seq to tokenledger_app;
grant select, insert, update on budget_spend to tokenledger_app;

-- Pre-authorisation: every decision (denials included), the hold it places on each budget
-- in scope, and the settlement by the usage event that carries its id. All append-only:
-- a hold is open while unsettled and unexpired.
create table authorizations (
  id uuid primary key,
  tenant_id text collate "C" not null,
  api_key_id text collate "C",
  tags jsonb not null default '{}',
  requested_model text collate "C" not null,
  requested_provider text collate "C",
  decision text collate "C" not null check (decision in ('allow', 'downgrade', 'deny')),
  provider text collate "C",
  model text collate "C",
  estimated_input_tokens bigint not null,
  max_tokens bigint not null,
  -- worst-case customer price (estimated input + max_tokens of output, list rates)
  estimated_cost numeric,
  currency char(3) not null,
  denied_by text collate "C",
  reason text collate "C" not null,
  expires_at timestamptz not null,
  decided_at timestamptz not null default now()
);
create index authorizations_tenant on authorizations (tenant_id, decided_at);

create table auth_hold_budgets (
  hold_id uuid not null references authorizations (id),
  tenant_id text collate "C" not null,
  budget text collate "C" not null,
  period text collate "C" not null,
  amount numeric not null check (amount >= 0),
  expires_at timestamptz not null,
  primary key (hold_id, budget)
);
create index auth_hold_budgets_open on auth_hold_budgets (tenant_id, budget, period, expires_at);

create table auth_settlements (
  hold_id uuid primary key,
  tenant_id text collate "C" not null,
  event_id text collate "C" not null,
  settled_at timestamptz not null default now()
);

do $$
declare t text;
begin
  foreach t in array array['authorizations', 'auth_hold_budgets', 'auth_settlements'] loop
    execute format('create trigger %I before update or delete on %I for each row execute function refuse_change()', t || '_no_update', t);
    execute format('create trigger %I before truncate on %I for each statement execute function refuse_change()', t || '_no_truncate', t);
  end loop;
end
$$;

grant select, insert on authorizations, auth_hold_budgets, auth_settlements to tokenledger_app;
