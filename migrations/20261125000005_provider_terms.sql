-- Our own reservations with providers (the same shape as a tenant's, without a tenant),
-- and tokens per provider, model and UTC minute for the models they cover (a projection
-- over usage events: the live headroom the pricing engine ranks on).

create table provider_reservations (
  id bigserial primary key,
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
create index provider_reservations_model on provider_reservations (provider, model, effective_from);
create trigger provider_reservations_no_update before update or delete on provider_reservations
  for each row execute function refuse_change();
create trigger provider_reservations_no_truncate before truncate on provider_reservations
  for each statement execute function refuse_change();

-- tokens (input + output) of usage events whose (provider, model) had a provider
-- reservation version effective at or before the event's time
create table provider_usage_minutes (
  provider text collate "C" not null,
  model text collate "C" not null,
  minute text collate "C" not null,
  tokens bigint not null,
  primary key (provider, model, minute)
) with (fillfactor = 70);

grant select, insert on provider_reservations to tokenledger_app;
grant usage, select on sequence provider_reservations_id_seq to tokenledger_app;
grant select, insert, update on provider_usage_minutes to tokenledger_app;
