-- tokenledger core schema: the record (append-only), configuration, and projections.
-- Runs as the owning role. The service connects as tokenledger_app, which owns nothing
-- and may only select/insert on the record.

do $$
begin
  create role tokenledger_app login;
exception when duplicate_object or unique_violation then
  null;
end
$$;

grant usage on schema public to tokenledger_app;

-- Refuses any change to a row of the record, whoever asks (the owner included).
create function refuse_change() returns trigger language plpgsql as $$
begin
  raise exception 'tokenledger: % on % is refused: the record is append-only', tg_op, tg_table_name
    using errcode = 'insufficient_privilege';
end
$$;

-- ---------------------------------------------------------------- configuration

create table tenants (
  id text primary key check (id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
  name text not null,
  -- the billing currency, fixed at creation (ISO 4217 code); there are no exchange rates
  currency char(3) not null check (currency ~ '^[A-Z]{3}$'),
  created_at timestamptz not null default now()
);
create trigger tenants_no_update before update or delete on tenants
  for each row execute function refuse_change();
create trigger tenants_no_truncate before truncate on tenants
  for each statement execute function refuse_change();

create table api_keys (
  id uuid primary key,
  tenant_id text not null references tenants (id),
  name text not null default '',
  -- the first characters of the key, shown in listings so a user can tell keys apart
  display_prefix text not null,
  -- sha256 of the whole key; the key itself is never stored
  key_hash bytea not null unique,
  created_at timestamptz not null default now(),
  revoked_at timestamptz
);
create index api_keys_tenant on api_keys (tenant_id);

-- One row per tenant: the lock taken by the ledger writer while it appends the tenant's
-- events, and the last ledger sequence number assigned.
create table tenant_heads (
  tenant_id text primary key references tenants (id),
  last_seq bigint not null default 0
);

-- Effective-dated, immutable price versions per (provider, model, region, side).
-- side 'cost' is what the provider charges us; side 'price' is an explicit customer price
-- (without one, the customer price is the cost rate times the markup rule in force).
-- Rates are per million tokens. Null cached/cache-write rates fall back to input, null
-- reasoning falls back to output; null long-context rates fall back to the base rate.
create table price_versions (
  id bigserial primary key,
  provider text not null,
  model text not null,
  region text not null default '', -- '' = any region
  side text not null check (side in ('cost', 'price')),
  currency char(3) not null check (currency ~ '^[A-Z]{3}$'),
  effective_from timestamptz not null,
  input_per_mtok numeric not null check (input_per_mtok >= 0),
  cached_input_per_mtok numeric check (cached_input_per_mtok >= 0),
  cache_write_per_mtok numeric check (cache_write_per_mtok >= 0),
  output_per_mtok numeric not null check (output_per_mtok >= 0),
  reasoning_per_mtok numeric check (reasoning_per_mtok >= 0),
  -- fraction taken off every token class for batch requests (0.5 = half price)
  batch_discount numeric not null default 0 check (batch_discount >= 0 and batch_discount <= 1),
  -- above this many prompt tokens the whole request is priced at the long-context rates
  long_context_threshold_tokens bigint check (long_context_threshold_tokens > 0),
  long_input_per_mtok numeric check (long_input_per_mtok >= 0),
  long_cached_input_per_mtok numeric check (long_cached_input_per_mtok >= 0),
  long_cache_write_per_mtok numeric check (long_cache_write_per_mtok >= 0),
  long_output_per_mtok numeric check (long_output_per_mtok >= 0),
  long_reasoning_per_mtok numeric check (long_reasoning_per_mtok >= 0),
  source text not null default '',
  created_at timestamptz not null default now()
);
create index price_versions_key on price_versions (provider, model, region, side, effective_from);
create trigger price_versions_no_update before update or delete on price_versions
  for each row execute function refuse_change();
create trigger price_versions_no_truncate before truncate on price_versions
  for each statement execute function refuse_change();

-- Markup rules: customer price = cost rate x (1 + percent / 100). tenant_id null = global.
create table markup_rules (
  id bigserial primary key,
  tenant_id text references tenants (id),
  percent numeric not null check (percent > -100),
  effective_from timestamptz not null,
  created_at timestamptz not null default now()
);
create index markup_rules_key on markup_rules (tenant_id, effective_from);
create trigger markup_rules_no_update before update or delete on markup_rules
  for each row execute function refuse_change();
create trigger markup_rules_no_truncate before truncate on markup_rules
  for each statement execute function refuse_change();

-- ---------------------------------------------------------------- the record

-- Every event of a tenant's log (usage, adjustment, system), in ledger order.
create table events (
  tenant_id text not null references tenants (id),
  id text not null,
  -- ledger order: assigned inside the append transaction under the tenant's lock
  seq bigint not null,
  type text not null,
  -- usage events only; unique per tenant (partial index below)
  request_id text,
  source text not null,
  -- the CloudEvents time: when the request happened (usage) or was decided (adjustment)
  occurred_at timestamptz not null,
  data jsonb not null,
  -- sha256 of the canonical envelope: same key + same hash = duplicate, else conflict
  payload_hash bytea not null,
  recorded_at timestamptz not null default now(),
  primary key (tenant_id, id),
  unique (tenant_id, seq)
);
create unique index events_request_id on events (tenant_id, request_id)
  where type = 'tokenledger.usage.v1';
create trigger events_no_update before update or delete on events
  for each row execute function refuse_change();
create trigger events_no_truncate before truncate on events
  for each statement execute function refuse_change();

-- Money moves only as transfers: debit account, credit account, positive amount.
-- Accounts are per tenant (tenant_id, account) so writers for different tenants never
-- contend on a balance row.
create table transfers (
  id bigserial primary key,
  tenant_id text not null references tenants (id),
  seq bigint not null,
  event_id text not null,
  kind text not null check (kind in ('usage_price', 'usage_cost', 'adjustment')),
  debit_account text not null,
  credit_account text not null,
  amount numeric not null check (amount > 0),
  currency char(3) not null,
  cost_version_id bigint references price_versions (id),
  price_version_id bigint references price_versions (id),
  markup_rule_id bigint references markup_rules (id),
  -- the full rating breakdown (usage) or the adjustment's reason
  breakdown jsonb not null,
  recorded_at timestamptz not null default now(),
  check (debit_account <> credit_account),
  foreign key (tenant_id, event_id) references events (tenant_id, id)
);
create index transfers_event on transfers (tenant_id, seq);
create trigger transfers_no_update before update or delete on transfers
  for each row execute function refuse_change();
create trigger transfers_no_truncate before truncate on transfers
  for each statement execute function refuse_change();

-- Same key, different payload (or a request_id reused by another event id): the first
-- stays, the newcomer is recorded here.
create table event_conflicts (
  id bigserial primary key,
  tenant_id text not null,
  event_id text not null,
  kind text not null check (kind in ('payload_differs', 'request_id_taken')),
  existing_event_id text not null,
  payload jsonb not null,
  payload_hash bytea not null,
  recorded_at timestamptz not null default now(),
  unique (tenant_id, event_id, payload_hash)
);
create trigger event_conflicts_no_update before update or delete on event_conflicts
  for each row execute function refuse_change();
create trigger event_conflicts_no_truncate before truncate on event_conflicts
  for each statement execute function refuse_change();

-- Bus messages the writer could not apply, with the reason. Re-driving republishes the
-- payload; a re-drive is itself recorded (dead_letter_redrives), never an edit.
create table dead_letters (
  id bigserial primary key,
  reason text not null,
  detail text not null,
  subject text not null,
  tenant_id text,
  event_id text,
  stream_seq bigint,
  payload bytea not null,
  recorded_at timestamptz not null default now()
);
create index dead_letters_event on dead_letters (tenant_id, event_id);
create trigger dead_letters_no_update before update or delete on dead_letters
  for each row execute function refuse_change();
create trigger dead_letters_no_truncate before truncate on dead_letters
  for each statement execute function refuse_change();

create table dead_letter_redrives (
  id bigserial primary key,
  dead_letter_id bigint not null references dead_letters (id),
  redriven_at timestamptz not null default now()
);
create trigger dead_letter_redrives_no_update before update or delete on dead_letter_redrives
  for each row execute function refuse_change();
create trigger dead_letter_redrives_no_truncate before truncate on dead_letter_redrives
  for each statement execute function refuse_change();

-- ---------------------------------------------------------------- projections
-- Derived from events + transfers; dropped and rebuilt by `tokenledger rebuild`.

create table request_views (
  tenant_id text not null,
  request_id text not null,
  event_id text not null,
  seq bigint not null,
  occurred_at timestamptz not null,
  api_key_id text not null default '',
  provider text not null,
  model text not null,
  status text not null,
  batch boolean not null,
  input_tokens bigint not null,
  cached_input_tokens bigint not null,
  cache_write_tokens bigint not null,
  output_tokens bigint not null,
  reasoning_tokens bigint not null,
  price_amount numeric not null,
  cost_amount numeric not null,
  currency char(3) not null,
  primary key (tenant_id, request_id)
);
create index request_views_order on request_views (tenant_id, occurred_at desc, seq desc);

-- per tenant x UTC day x model x provider x API key
create table usage_rollups (
  tenant_id text not null,
  day date not null,
  model text not null,
  provider text not null,
  api_key_id text not null default '',
  requests bigint not null,
  input_tokens bigint not null,
  cached_input_tokens bigint not null,
  cache_write_tokens bigint not null,
  output_tokens bigint not null,
  reasoning_tokens bigint not null,
  price_amount numeric not null,
  cost_amount numeric not null,
  currency char(3) not null,
  primary key (tenant_id, day, model, provider, api_key_id)
);

-- balance = debits - credits; the sum over all accounts of a currency is zero
create table account_balances (
  tenant_id text not null,
  account text not null,
  currency char(3) not null,
  balance numeric not null,
  primary key (tenant_id, account, currency)
);

-- ---------------------------------------------------------------- privileges

grant select, insert on tenants, api_keys, price_versions, markup_rules, events,
  transfers, event_conflicts, dead_letters, dead_letter_redrives to tokenledger_app;
grant update (revoked_at) on api_keys to tokenledger_app;
grant select, insert, update on tenant_heads to tokenledger_app;
grant select, insert, update on request_views, usage_rollups, account_balances to tokenledger_app;
grant usage, select on all sequences in schema public to tokenledger_app;
