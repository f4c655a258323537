-- A single counter bumped by every insert into a commercial-term table, in commit order
-- (the row lock serialises the bumps). Writers and the pricing engine reload the price
-- book when it moved. (A sum of the tables' newest ids could miss a row whose id was
-- taken before another's but committed after it.)
create table terms_version (
  id integer primary key check (id = 1),
  n bigint not null
);
insert into terms_version values (1, 0);

create function bump_terms_version() returns trigger
  language plpgsql security definer set search_path = public as $$
begin
  update terms_version set n = n + 1 where id = 1;
  return null;
end
$$;

do $$
declare t text;
begin
  foreach t in array array['price_versions', 'markup_rules', 'tier_schedules', 'budgets',
                           'routing_classes', 'commitments', 'reservations',
                           'provider_reservations'] loop
    execute format('create trigger %I after insert on %I for each statement execute function bump_terms_version()',
                   t || '_bump_terms_version', t);
  end loop;
end
$$;

grant select on terms_version to tokenledger_app;
