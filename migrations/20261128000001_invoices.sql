-- Invoices and reconciliation.
--
-- invoice_accruals is a projection: what each tenant's invoice for a billing period holds so
-- far, line by line at full precision, kept by the ledger writer in the batch that rates the
-- events and rebuilt from the record. The draft invoice is read from it; the close freezes it
-- into an immutable invoice (record). A line's period is the invoice that bills it: an
-- event's own month, or, when that month was closed before the event in ledger order, the
-- next open month (a late line, origin_period naming the month the usage belongs to).

create table invoice_accruals (
  tenant_id text collate "C" not null,
  period text collate "C" not null,
  -- the line's identity (kind, origin and attributes below, canonically joined)
  line_key text collate "C" not null,
  kind text collate "C" not null,
  origin_period text collate "C" not null default '',
  provider text collate "C" not null default '',
  model text collate "C" not null default '',
  token_class text collate "C" not null default '',
  -- customer rate per million tokens (usage lines)
  unit_price numeric,
  -- the schedule, commitment, reservation or adjustment the line is about
  name text collate "C" not null default '',
  -- the price book / term versions the line was priced under
  refs text collate "C" not null default '',
  -- what the key does not say (an adjustment's reason)
  description text not null default '',
  quantity numeric not null,
  amount numeric not null,
  -- usage rows (one per provider, model, versions and context length; quantity counts
  -- requests): tokens, list amount and customer rate per million tokens of each class
  input_tokens numeric not null default 0,
  cached_input_tokens numeric not null default 0,
  cache_write_tokens numeric not null default 0,
  output_tokens numeric not null default 0,
  reasoning_tokens numeric not null default 0,
  input_amount numeric not null default 0,
  cached_input_amount numeric not null default 0,
  cache_write_amount numeric not null default 0,
  output_amount numeric not null default 0,
  reasoning_amount numeric not null default 0,
  input_rate numeric,
  cached_input_rate numeric,
  cache_write_rate numeric,
  output_rate numeric,
  reasoning_rate numeric,
  primary key (tenant_id, period, line_key)
) with (fillfactor = 70);

-- Finalised invoices: the record. Numbers are gap-free (invoice_counters is updated in the
-- closing transaction); the document is stored exactly as hashed.
create table invoices (
  number text collate "C" primary key,
  serial bigint not null unique,
  tenant_id text collate "C" not null references tenants (id),
  period text collate "C" not null,
  currency char(3) not null,
  -- the close event that cut the period off, and its place in the tenant's ledger order
  close_event_id text collate "C" not null,
  close_seq bigint not null,
  total numeric not null,
  document json not null,
  content_hash text collate "C" not null,
  finalized_at timestamptz not null default now(),
  unique (tenant_id, period)
);
create trigger invoices_no_update before update or delete on invoices
  for each row execute function refuse_change();
create trigger invoices_no_truncate before truncate on invoices
  for each statement execute function refuse_change();

create table invoice_counters (
  series text collate "C" primary key,
  last bigint not null
);
insert into invoice_counters values ('INV', 0), ('CN', 0), ('DN', 0);

-- Credit and debit notes: corrections to a finalised invoice. Each is backed by an
-- adjustment event in the tenant's log (which the next open invoice settles).
create table invoice_notes (
  number text collate "C" primary key,
  serial bigint not null,
  kind text collate "C" not null check (kind in ('credit', 'debit')),
  tenant_id text collate "C" not null references tenants (id),
  invoice_number text collate "C" not null references invoices (number),
  event_id text collate "C" not null,
  amount numeric not null check (amount > 0),
  currency char(3) not null,
  reason text not null,
  document json not null,
  content_hash text collate "C" not null,
  created_at timestamptz not null default now(),
  unique (kind, serial),
  unique (tenant_id, event_id)
);
create trigger invoice_notes_no_update before update or delete on invoice_notes
  for each row execute function refuse_change();
create trigger invoice_notes_no_truncate before truncate on invoice_notes
  for each statement execute function refuse_change();

-- Provider usage/invoice exports as imported (normalised rows), and reconciliation runs
-- with their findings. Imports and runs are kept as they were made (append-only).
create table provider_exports (
  id bigserial primary key,
  provider text collate "C" not null,
  period text collate "C" not null,
  format text collate "C" not null,
  filename text not null default '',
  currency char(3),
  rows integer not null,
  imported_at timestamptz not null default now()
);
create table provider_export_rows (
  export_id bigint not null references provider_exports (id),
  line integer not null,
  provider_request_id text collate "C",
  day date not null,
  model text collate "C" not null,
  requests bigint not null,
  -- input includes cached and cache-write tokens; output includes reasoning (as providers bill)
  input_tokens bigint not null,
  cached_input_tokens bigint not null,
  output_tokens bigint not null,
  amount numeric,
  primary key (export_id, line)
);

create table reconciliations (
  id bigserial primary key,
  kind text collate "C" not null check (kind in ('internal', 'provider', 'margin')),
  period text collate "C" not null,
  provider text collate "C",
  export_id bigint references provider_exports (id),
  parameters jsonb not null default '{}',
  summary jsonb not null,
  created_at timestamptz not null default now()
);
create table reconciliation_findings (
  reconciliation_id bigint not null references reconciliations (id),
  n integer not null,
  kind text collate "C" not null,
  tenant_id text collate "C",
  provider_request_id text collate "C",
  day date,
  model text collate "C",
  amount_at_stake numeric not null default 0,
  detail jsonb not null,
  primary key (reconciliation_id, n)
);
create trigger provider_exports_no_update before update or delete on provider_exports
  for each row execute function refuse_change();
create trigger provider_export_rows_no_update before update or delete on provider_export_rows
  for each row execute function refuse_change();
create trigger reconciliations_no_update before update or delete on reconciliations
  for each row execute function refuse_change();
create trigger reconciliation_findings_no_update before update or delete on reconciliation_findings
  for each row execute function refuse_change();
create trigger provider_exports_no_truncate before truncate on provider_exports
  for each statement execute function refuse_change();
create trigger provider_export_rows_no_truncate before truncate on provider_export_rows
  for each statement execute function refuse_change();
create trigger reconciliations_no_truncate before truncate on reconciliations
  for each statement execute function refuse_change();
create trigger reconciliation_findings_no_truncate before truncate on reconciliation_findings
  for each statement execute function refuse_change();

grant select, insert, update on invoice_accruals to tokenledger_app;
grant select, insert on invoices, invoice_notes, provider_exports, provider_export_rows,
  reconciliations, reconciliation_findings to tokenledger_app;
grant select, update on invoice_counters to tokenledger_app;
grant usage, select on sequence provider_exports_id_seq, reconciliations_id_seq to tokenledger_app;
