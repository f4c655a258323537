-- Our own committed spend with providers, the live list cost that draws it down, and the
-- per-period settlement of what our provider commitments and reservations are worth.

-- Versions of a commitment we made to a provider: `amount` per UTC month in `currency`,
-- drawn down at `discount_percent` off the list cost of the provider's models (one model
-- if `model` is set); past it, overage at list less `overage_discount_percent`; the unused
-- remainder is owed at the period's settlement (a true-up).
create table provider_commitments (
  id bigserial primary key,
  name text collate "C" not null check (name ~ '^[A-Za-z0-9._-]{1,64}$'),
  effective_from timestamptz not null,
  active boolean not null default true,
  provider text collate "C" not null check (provider <> ''),
  model text collate "C" check (model <> ''),
  currency char(3) not null check (currency ~ '^[A-Z]{3}$'),
  amount numeric not null check (amount > 0),
  discount_percent numeric not null check (discount_percent >= 0 and discount_percent < 100),
  overage_discount_percent numeric not null default 0
    check (overage_discount_percent >= 0 and overage_discount_percent < 100),
  created_at timestamptz not null default now()
);
create index provider_commitments_provider on provider_commitments (provider, effective_from);
create trigger provider_commitments_no_update before update or delete on provider_commitments
  for each row execute function refuse_change();
create trigger provider_commitments_no_truncate before truncate on provider_commitments
  for each statement execute function refuse_change();
create trigger provider_commitments_bump_terms_version after insert on provider_commitments
  for each statement execute function bump_terms_version();

-- A projection: our list cost (the usage_cost transfers) per provider, model, UTC month and
-- currency: the live drawdown of our provider commitments the pricing engine ranks on
-- (kept for every provider, so a commitment added or backdated later finds it complete).
create table provider_period_costs (
  provider text collate "C" not null,
  model text collate "C" not null,
  period text collate "C" not null,
  currency char(3) not null,
  list_cost numeric not null,
  primary key (provider, model, period, currency)
) with (fillfactor = 70);

-- The record of each settlement run that changed something, per provider, month and
-- currency: the inputs read from the ledger (list cost and reservation coverage per model),
-- the terms versions used, and the amounts; its transfers are held by `_operator` (no
-- tenant id can take that form) with `seq` = this row's id. A later revision (usage of
-- the month recorded after the first) states the full figures again and posts the change.
create table provider_settlements (
  id bigserial primary key,
  provider text collate "C" not null,
  period text collate "C" not null,
  currency char(3) not null,
  revision integer not null check (revision > 0),
  inputs jsonb not null,
  figures jsonb not null,
  created_at timestamptz not null default now(),
  unique (provider, period, currency, revision)
);
create trigger provider_settlements_no_update before update or delete on provider_settlements
  for each row execute function refuse_change();
create trigger provider_settlements_no_truncate before truncate on provider_settlements
  for each statement execute function refuse_change();

alter table transfers drop constraint transfers_kind_check;
alter table transfers add constraint transfers_kind_check
  check (kind in ('usage_price', 'usage_cost', 'adjustment', 'tier_credit',
                  'commitment_drawdown', 'commitment_billed', 'commitment_true_up',
                  'reservation_fee', 'provider_reservation_credit', 'provider_reservation_fee',
                  'provider_commitment_discount', 'provider_commitment_true_up'));

grant select, insert on provider_commitments, provider_settlements to tokenledger_app;
grant usage, select on sequence provider_commitments_id_seq, provider_settlements_id_seq
  to tokenledger_app;
grant select, insert, update on provider_period_costs to tokenledger_app;

-- the currency our provider reservation's unit-hour price is in (its fees are settled in
-- it; the list cost it covers is credited in the currency that cost was recorded in)
alter table provider_reservations add column currency char(3) not null default 'USD'
  check (currency ~ '^[A-Z]{3}$');
