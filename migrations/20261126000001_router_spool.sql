-- The router's durable spool: usage events it could not get acknowledged by JetStream
-- (NATS down or slow). Rows are removed only after JetStream acknowledged the message;
-- a message published twice is dropped by JetStream's duplicate window or, after it, by
-- the ledger's unique keys. Not part of the record: an outbox, so the runtime role may
-- delete from it.
create table router_spool (
  msg_id text collate "C" primary key,
  subject text collate "C" not null,
  payload bytea not null,
  spooled_at timestamptz not null default now()
);
create index router_spool_age on router_spool (spooled_at);
-- (select ... for update, which the re-drive uses to share the work, needs update)
grant select, insert, update, delete on router_spool to tokenledger_app;
