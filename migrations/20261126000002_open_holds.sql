-- The open-hold index: the holds that currently count against budgets (placed, not yet
-- settled by a usage event). It is an index over the record, kept in the same
-- transactions that write it: the authorizer inserts a row with each hold it places, the
-- ledger writer deletes the rows of each hold a usage event settles, and expired rows are
-- swept. Authorisation then sums only in-flight holds instead of every hold of the period
-- (which grows with traffic). `tokenledger verify` checks it against the record.
create table open_holds (
  hold_id uuid not null,
  budget text collate "C" not null,
  tenant_id text collate "C" not null,
  period text collate "C" not null,
  amount numeric not null,
  expires_at timestamptz not null,
  primary key (hold_id, budget)
);
create index open_holds_budget on open_holds (tenant_id, budget, period);
insert into open_holds (hold_id, budget, tenant_id, period, amount, expires_at)
select h.hold_id, h.budget, h.tenant_id, h.period, h.amount, h.expires_at
from auth_hold_budgets h
where h.expires_at > now()
  and not exists (select 1 from auth_settlements s where s.hold_id = h.hold_id);
grant select, insert, delete on open_holds to tokenledger_app;
