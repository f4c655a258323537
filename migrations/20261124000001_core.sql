-- tokenledger core schema: the record (append-only), configuration, and projections.
-- Text columns use the "C" collation: keys compare bytewise, several times faster in
-- btree indexes than a linguistic collation, and nothing here needs linguistic order.
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
  id text collate "C" primary key check (id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
  name text collate "C" not null,
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
  tenant_id text collate "C" not null references tenants (id),
  name text collate "C" not null default '',
  -- the first characters of the key, shown in listings so a user can tell keys apart
  display_prefix text collate "C" not null,
  -- sha256 of the whole key; the key itself is never stored
  key_hash bytea not null unique,
  created_at timestamptz not null default now(),
  revoked_at timestamptz
);
create index api_keys_tenant on api_keys (tenant_id);

-- One row per tenant: the lock taken by the ledger writer while it appends the tenant's
-- events, and the last ledger sequence number assigned.
create table tenant_heads (
  tenant_id text collate "C" primary key references tenants (id),
  last_seq bigint not null default 0
) with (fillfactor = 50); -- updated by every batch: room for HOT updates

-- Effective-dated, immutable price versions per (provider, model, region, side).
-- side 'cost' is what the provider charges us; side 'price' is an explicit customer price
-- (without one, the customer price is the cost rate times the markup rule in force).
-- Rates are per million tokens. Null cached/cache-write rates fall back to input, null
-- reasoning falls back to output; null long-context rates fall back to the base rate.
create table price_versions (
  id bigserial primary key,
  provider text collate "C" not null,
  model text collate "C" not null,
  region text collate "C" not null default '', -- '' = any region
  side text collate "C" not null check (side in ('cost', 'price')),
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
  source text collate "C" not null default '',
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
  tenant_id text collate "C" references tenants (id),
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
-- No foreign keys on the hot-path tables: the writer appends an event, its transfers and
-- their tenant check in one transaction, and per-row FK triggers would double the cost
-- of an append.
create table events (
  tenant_id text collate "C" not null,
  id text collate "C" not null,
  -- ledger order: assigned inside the append transaction under the tenant's lock
  seq bigint not null,
  type text collate "C" not null,
  source text collate "C" not null,
  -- the CloudEvents time: when the request happened (usage) or was decided (adjustment)
  occurred_at timestamptz not null,
  -- the canonical CloudEvent exactly as validated, hashed and published (UTF-8 JSON)
  envelope bytea not null,
  -- sha256 of envelope: same key + same hash = duplicate, else conflict
  payload_hash bytea not null,
  -- usage facts, typed (null for other event types); request_id is unique per tenant
  request_id text collate "C",
  model text collate "C",
  provider text collate "C",
  api_key_id text collate "C",
  status text collate "C",
  batch boolean,
  input_tokens bigint,
  cached_input_tokens bigint,
  cache_write_tokens bigint,
  output_tokens bigint,
  reasoning_tokens bigint,
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
-- contend on a balance row. An event's transfers are its legs 0, 1, ...
create table transfers (
  tenant_id text collate "C" not null,
  -- the event's ledger position, and this transfer's place among its legs
  seq bigint not null,
  leg smallint not null,
  kind text collate "C" not null check (kind in ('usage_price', 'usage_cost', 'adjustment')),
  debit_account text collate "C" not null,
  credit_account text collate "C" not null,
  amount numeric not null check (amount > 0),
  currency char(3) not null,
  cost_version_id bigint,
  price_version_id bigint,
  markup_rule_id bigint,
  -- on the event's first leg: the rating breakdown (usage; compact form, see README) or
  -- the adjustment itself
  breakdown json,
  recorded_at timestamptz not null default now(),
  primary key (tenant_id, seq, leg),
  check (debit_account <> credit_account)
);
create trigger transfers_no_update before update or delete on transfers
  for each row execute function refuse_change();
create trigger transfers_no_truncate before truncate on transfers
  for each statement execute function refuse_change();

-- Same key, different payload (or a request_id reused by another event id): the first
-- stays, the newcomer is recorded here.
create table event_conflicts (
  id bigserial primary key,
  tenant_id text collate "C" not null,
  event_id text collate "C" not null,
  kind text collate "C" not null check (kind in ('payload_differs', 'request_id_taken')),
  existing_event_id text collate "C" not null,
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
  reason text collate "C" not null,
  detail text collate "C" not null,
  subject text collate "C" not null,
  tenant_id text collate "C",
  event_id text collate "C",
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

-- Per-request views are one-to-one with usage events, so they are a plain SQL view over
-- the record (nothing to aggregate, always equal to it by construction).
create view request_views as
select e.tenant_id, e.request_id, e.id as event_id, e.seq, e.occurred_at,
  coalesce(e.api_key_id, '') as api_key_id, e.provider, e.model, e.status, e.batch,
  e.input_tokens, e.cached_input_tokens, e.cache_write_tokens, e.output_tokens,
  e.reasoning_tokens, coalesce(p.price, 0) as price_amount, coalesce(p.cost, 0) as cost_amount,
  t.currency
from events e
join tenants t on t.id = e.tenant_id
left join lateral (
  select sum(x.amount) filter (where x.kind = 'usage_price') as price,
         sum(x.amount) filter (where x.kind = 'usage_cost') as cost
  from transfers x where x.tenant_id = e.tenant_id and x.seq = e.seq
) p on true
where e.type = 'tokenledger.usage.v1';

-- per tenant x UTC day x model x provider x API key
create table usage_rollups (
  tenant_id text collate "C" not null,
  day date not null,
  model text collate "C" not null,
  provider text collate "C" not null,
  api_key_id text collate "C" not null default '',
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
) with (fillfactor = 70); -- room on each page for HOT updates by the upserts

-- balance = debits - credits; the sum over all accounts of a currency is zero
create table account_balances (
  tenant_id text collate "C" not null,
  account text collate "C" not null,
  currency char(3) not null,
  balance numeric not null,
  primary key (tenant_id, account, currency)
) with (fillfactor = 50); -- updated by every batch: room for HOT updates

-- ---------------------------------------------------------------- privileges

grant select, insert on tenants, api_keys, price_versions, markup_rules, events,
  transfers, event_conflicts, dead_letters, dead_letter_redrives to tokenledger_app;
grant update (revoked_at) on api_keys to tokenledger_app;
grant select, insert, update on tenant_heads to tokenledger_app;
grant select, insert, update on usage_rollups, account_balances to tokenledger_app;
grant select on request_views to tokenledger_app;
grant usage, select on all sequences in schema public to tokenledger_app;
