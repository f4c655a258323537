-- Routing classes (commercial terms: immutable, effective-dated; global or per tenant)
-- with shipped defaults.

create table routing_classes (
  id bigserial primary key,
  -- null: global; a tenant's own version of a name overrides the global one
  tenant_id text collate "C" references tenants (id),
  name text collate "C" not null check (name ~ '^[a-z0-9][a-z0-9:._-]{0,63}$'),
  effective_from timestamptz not null,
  active boolean not null default true,
  quality_floor numeric not null check (quality_floor >= 0 and quality_floor <= 1),
  -- [{"provider": "openai", "model": "gpt-5-mini", "quality": "0.8"}]
  candidates jsonb not null,
  created_at timestamptz not null default now()
);
create index routing_classes_name on routing_classes (name, tenant_id, effective_from);
create trigger routing_classes_no_update before update or delete on routing_classes
  for each row execute function refuse_change();
create trigger routing_classes_no_truncate before truncate on routing_classes
  for each statement execute function refuse_change();
grant select, insert on routing_classes to tokenledger_app;
grant usage, select on sequence routing_classes_id_seq to tokenledger_app;

-- Defaults. Quality scores are rough starting points on a 0-1 scale for general chat
-- work; operators publish their own versions (globally or per tenant).
insert into routing_classes (name, effective_from, quality_floor, candidates) values
('auto:frontier', '2000-01-01', 0.85, '[
  {"provider": "openai", "model": "gpt-5", "quality": "0.95"},
  {"provider": "anthropic", "model": "claude-opus-4-5", "quality": "0.95"},
  {"provider": "anthropic", "model": "claude-sonnet-4-5", "quality": "0.9"},
  {"provider": "google", "model": "gemini-2.5-pro", "quality": "0.9"},
  {"provider": "openai", "model": "gpt-4.1", "quality": "0.85"}]'),
('auto:balanced', '2000-01-01', 0.7, '[
  {"provider": "openai", "model": "gpt-5-mini", "quality": "0.8"},
  {"provider": "anthropic", "model": "claude-haiku-4-5", "quality": "0.75"},
  {"provider": "google", "model": "gemini-2.5-flash", "quality": "0.75"},
  {"provider": "deepseek", "model": "deepseek-chat", "quality": "0.75"},
  {"provider": "qwen", "model": "qwen-plus", "quality": "0.7"},
  {"provider": "mistral", "model": "mistral-medium-latest", "quality": "0.7"},
  {"provider": "openai", "model": "gpt-4o-mini", "quality": "0.7"}]'),
('auto:budget', '2000-01-01', 0.5, '[
  {"provider": "openai", "model": "gpt-5-nano", "quality": "0.6"},
  {"provider": "google", "model": "gemini-2.5-flash-lite", "quality": "0.6"},
  {"provider": "deepseek", "model": "deepseek-chat", "quality": "0.75"},
  {"provider": "openai", "model": "gpt-4.1-nano", "quality": "0.55"},
  {"provider": "mistral", "model": "mistral-small-latest", "quality": "0.55"},
  {"provider": "qwen", "model": "qwen-turbo", "quality": "0.5"}]');
