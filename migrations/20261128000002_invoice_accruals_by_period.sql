-- The clock looks for months with invoice lines and no close: by period first.
create index invoice_accruals_period on invoice_accruals (period, tenant_id);
