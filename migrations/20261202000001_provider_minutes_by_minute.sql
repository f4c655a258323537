-- Quotes and the tenant view read the current minute's tokens under our provider
-- reservations (`where minute = $1`, summed over providers, models and lanes). The primary
-- key starts with the provider, so that read was a scan of every minute ever recorded,
-- growing by (covered models x lanes) rows a minute; this index makes it a probe.
create index provider_usage_minutes_minute on provider_usage_minutes (minute);
