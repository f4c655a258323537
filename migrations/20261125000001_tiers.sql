-- Volume tier discounts: schedule versions (commercial terms, immutable, effective-dated),
-- the volume-mode credit transfer, and the per-period position projection.

create table tier_schedules (
  id bigserial primary key,
  tenant_id text collate "C" not null references tenants (id),
  -- versions of one schedule share its name; the latest effective at an event's time applies
  name text collate "C" not null check (name ~ '^[A-Za-z0-9._-]{1,64}$'),
  effective_from timestamptz not null,
  mode text collate "C" not null check (mode in ('graduated', 'volume')),
  metric text collate "C" not null check (metric in ('tokens', 'spend')),
  scope text collate "C" not null check (scope in ('all', 'provider', 'model')),
  scope_value text collate "C" not null default '',
  -- [{"up_to": "1000000" | null, "discount_percent": "10"}], validated by the service
  tiers jsonb not null,
  created_at timestamptz not null default now()
);
create index tier_schedules_tenant on tier_schedules (tenant_id, name, effective_from);
create trigger tier_schedules_no_update before update or delete on tier_schedules
  for each row execute function refuse_change();
create trigger tier_schedules_no_truncate before truncate on tier_schedules
  for each statement execute function refuse_change();

-- volume mode: the credit that brings a period's earlier units down to a reached tier
alter table transfers drop constraint transfers_kind_check;
alter table transfers add constraint transfers_kind_check
  check (kind in ('usage_price', 'usage_cost', 'adjustment', 'tier_credit'));

-- Projection: a tenant's running position per schedule name and period (UTC month),
-- rebuilt from the tier part of the stored breakdowns.
create table tier_positions (
  tenant_id text collate "C" not null,
  schedule text collate "C" not null,
  period text collate "C" not null,
  units numeric not null,
  list numeric not null,
  charged numeric not null,
  primary key (tenant_id, schedule, period)
) with (fillfactor = 50);

grant select, insert on tier_schedules to tokenledger_app;
grant usage, select on sequence tier_schedules_id_seq to tokenledger_app;
grant select, insert, update on tier_positions to tokenledger_app;
