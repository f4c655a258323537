-- `auth_hold_budgets_open` served sums of a budget's open holds read from the record; they
-- are read from `open_holds` (the open-hold index) since it exists, and the last reader,
-- budget status, now does too. Every authorisation paid for an entry nobody read.
drop index if exists auth_hold_budgets_open;
