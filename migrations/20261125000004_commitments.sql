-- Committed spend: commitment versions (commercial terms), their per-period positions
-- (a projection), the transfers they make, and request views counting drawdowns.

create table commitments (
  id bigserial primary key,
  tenant_id text collate "C" not null references tenants (id),
  name text collate "C" not null check (name ~ '^[A-Za-z0-9._-]{1,64}$'),
  effective_from timestamptz not null,
  active boolean not null default true,
  amount numeric not null check (amount > 0),
  discount_percent numeric not null check (discount_percent >= 0 and discount_percent < 100),
  overage_rate_percent numeric not null default 100
    check (overage_rate_percent > 0 and overage_rate_percent <= 1000),
  created_at timestamptz not null default now()
);
create index commitments_tenant on commitments (tenant_id, effective_from);
create trigger commitments_no_update before update or delete on commitments
  for each row execute function refuse_change();
create trigger commitments_no_truncate before truncate on commitments
  for each statement execute function refuse_change();

-- per commitment and period (UTC month): drawn so far, and whether the close was applied
create table commitment_positions (
  tenant_id text collate "C" not null,
  commitment text collate "C" not null,
  period text collate "C" not null,
  drawn numeric not null,
  closed boolean not null,
  primary key (tenant_id, commitment, period)
) with (fillfactor = 50);

alter table transfers drop constraint transfers_kind_check;
alter table transfers add constraint transfers_kind_check
  check (kind in ('usage_price', 'usage_cost', 'adjustment', 'tier_credit',
                  'commitment_drawdown', 'commitment_billed', 'commitment_true_up'));

-- a request's price is what it was charged: overage (receivable) plus drawdown
-- (commitment account)
create or replace view request_views as
select e.tenant_id, e.request_id, e.id as event_id, e.seq, e.occurred_at,
  coalesce(e.api_key_id, '') as api_key_id, e.provider, e.model, e.status, e.batch,
  e.input_tokens, e.cached_input_tokens, e.cache_write_tokens, e.output_tokens,
  e.reasoning_tokens, coalesce(p.price, 0) as price_amount, coalesce(p.cost, 0) as cost_amount,
  t.currency
from events e
join tenants t on t.id = e.tenant_id
left join lateral (
  select sum(x.amount) filter (where x.kind in ('usage_price', 'commitment_drawdown')) as price,
         sum(x.amount) filter (where x.kind = 'usage_cost') as cost
  from transfers x where x.tenant_id = e.tenant_id and x.seq = e.seq
) p on true
where e.type = 'tokenledger.usage.v1';

grant select, insert on commitments to tokenledger_app;
grant usage, select on sequence commitments_id_seq to tokenledger_app;
grant select, insert, update on commitment_positions to tokenledger_app;
grant select on request_views to tokenledger_app;

-- Reserved throughput: reservation versions (commercial terms) and covered tokens per
-- reservation and UTC minute (a projection, the utilisation record).
create table reservations (
  id bigserial primary key,
  tenant_id text collate "C" not null references tenants (id),
  name text collate "C" not null check (name ~ '^[A-Za-z0-9._-]{1,64}$'),
  effective_from timestamptz not null,
  active boolean not null default true,
  provider text collate "C" not null,
  model text collate "C" not null,
  units integer not null check (units > 0),
  tokens_per_minute_per_unit bigint not null check (tokens_per_minute_per_unit > 0),
  price_per_unit_hour numeric not null check (price_per_unit_hour >= 0),
  created_at timestamptz not null default now()
);
create index reservations_tenant on reservations (tenant_id, effective_from);
create trigger reservations_no_update before update or delete on reservations
  for each row execute function refuse_change();
create trigger reservations_no_truncate before truncate on reservations
  for each statement execute function refuse_change();

create table reservation_usage (
  tenant_id text collate "C" not null,
  reservation text collate "C" not null,
  minute text collate "C" not null, -- YYYY-MM-DDTHH:MM (UTC)
  covered bigint not null,
  primary key (tenant_id, reservation, minute)
) with (fillfactor = 70);

alter table transfers drop constraint transfers_kind_check;
alter table transfers add constraint transfers_kind_check
  check (kind in ('usage_price', 'usage_cost', 'adjustment', 'tier_credit',
                  'commitment_drawdown', 'commitment_billed', 'commitment_true_up',
                  'reservation_fee'));

grant select, insert on reservations to tokenledger_app;
grant usage, select on sequence reservations_id_seq to tokenledger_app;
grant select, insert, update on reservation_usage to tokenledger_app;

-- the most output tokens a model may produce (from the price map's max_output_tokens):
-- pre-authorisation holds a request without max_tokens for this many
alter table price_versions add column max_output_tokens bigint check (max_output_tokens > 0);
