-- Budget leases: a router process holds part of a blocking budget's headroom as one hold
-- (an authorization with decision 'lease') and grants requests against it in memory; the
-- grants are written behind, each drawing its worst case out of the lease into its own
-- hold. A lease is released (its undrawn rest stops counting) by a settlement of its id.

alter table authorizations drop constraint authorizations_decision_check;
alter table authorizations add constraint authorizations_decision_check
  check (decision in ('allow', 'downgrade', 'deny', 'lease'));

-- what each grant drew out of a lease (append-only): the lease's open amount is its hold
-- less these
create table auth_lease_draws (
  lease_id uuid not null,
  budget text collate "C" not null,
  grant_id uuid not null,
  tenant_id text collate "C" not null,
  amount numeric not null check (amount > 0),
  primary key (lease_id, budget, grant_id)
);
create trigger auth_lease_draws_no_update before update or delete on auth_lease_draws
  for each row execute function refuse_change();
create trigger auth_lease_draws_no_truncate before truncate on auth_lease_draws
  for each statement execute function refuse_change();
grant select, insert on auth_lease_draws to tokenledger_app;

-- a usage event may carry a grant's id before the grant is written behind: its settlement
-- is recorded whatever it names, scoped to the event's tenant (so no tenant can settle,
-- or pre-empt the settlement of, another's hold)
alter table auth_settlements drop constraint auth_settlements_pkey;
alter table auth_settlements add primary key (hold_id, tenant_id);

-- the lease rows of the open-hold index shrink as grants draw on them
grant update on open_holds to tokenledger_app;
