-- The two projections every tenant's usage adds to (list cost per provider, model and
-- month; tokens per provider, model and minute under our provider reservations) were one
-- row per key, shared by all tenants: two writers on different tenants then queued on the
-- same row lock until the other committed (measured: 10-20 ms of every other batch).
-- Each key is now split into 16 lanes by the tenant (the first byte of sha256(tenant_id),
-- mod 16); the ledger writer routes tenants to its tasks by the same byte, so with 1, 2,
-- 4, 8 or 16 writer tasks no two of them ever touch the same row. Readers sum the lanes.
-- Both are projections: they are recomputed here from the record, as `rebuild` does.

create or replace function drop_primary_key(t regclass) returns void language plpgsql as $$
declare n text;
begin
  select conname into n from pg_constraint where conrelid = t and contype = 'p';
  execute format('alter table %s drop constraint %I', t, n);
end $$;

alter table provider_period_costs add column lane smallint not null default 0
  check (lane between 0 and 15);
-- (by whatever name: `rebuild` recreates a projection as rebuild_<table> and renames it,
-- which keeps its index names)
select drop_primary_key('provider_period_costs');
alter table provider_period_costs add primary key (provider, model, period, currency, lane);
alter table provider_period_costs alter column lane drop default;

alter table provider_usage_minutes add column lane smallint not null default 0
  check (lane between 0 and 15);
select drop_primary_key('provider_usage_minutes');
alter table provider_usage_minutes add primary key (provider, model, minute, lane);
alter table provider_usage_minutes alter column lane drop default;
drop function drop_primary_key(regclass);

delete from provider_period_costs;
insert into provider_period_costs (provider, model, period, currency, lane, list_cost)
select e.provider, e.model, to_char(e.occurred_at at time zone 'UTC', 'YYYY-MM'), x.currency,
  get_byte(sha256(convert_to(e.tenant_id, 'UTF8')), 0) % 16, sum(x.amount)
from events e
join transfers x on x.tenant_id = e.tenant_id and x.seq = e.seq and x.kind = 'usage_cost'
where e.type = 'tokenledger.usage.v1'
group by 1, 2, 3, 4, 5;

delete from provider_usage_minutes;
insert into provider_usage_minutes (provider, model, minute, lane, tokens)
select e.provider, e.model, to_char(e.occurred_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI'),
  get_byte(sha256(convert_to(e.tenant_id, 'UTF8')), 0) % 16,
  sum(e.input_tokens + e.output_tokens)
from events e
where e.type = 'tokenledger.usage.v1'
  and exists (select 1 from provider_reservations r where r.provider = e.provider
    and r.model = e.model and r.effective_from <= e.occurred_at)
group by 1, 2, 3, 4;
