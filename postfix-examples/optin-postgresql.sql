-- The opt-in table of policyd-ipv6 in PostgreSQL (optin_postgresql in policyd-ipv6.toml),
-- and the trigger that makes every daemon reload within a second of a change.
--
-- One row per entry, exactly as one line of the opt-in file: domain is "example.com" (that
-- domain) or ".example.com" (its subdomains); options is NULL or the same key=value words
-- (mode=report rdns=fcrdns). A row the file would refuse is skipped by the daemons with a
-- warning naming it; the other rows stay in force.
--
--   psql -d mail -f optin-postgresql.sql
--   psql -d mail -c "CREATE ROLE policyd LOGIN; GRANT SELECT ON policyd_ipv6_optin TO policyd"
--   psql -d mail -c "INSERT INTO policyd_ipv6_optin (domain) VALUES ('example.com')"
--
-- The daemons run "SELECT domain, options FROM policyd_ipv6_optin" (optin_query) and LISTEN on
-- the channel policyd_ipv6_optin (optin_notify_channel); they need only SELECT.

CREATE TABLE IF NOT EXISTS policyd_ipv6_optin (
    domain  text PRIMARY KEY CHECK (domain <> ''),
    options text,
    changed timestamptz NOT NULL DEFAULT now()
);

-- One NOTIFY per statement (not per row): a bulk load makes one reload. NOTIFY is delivered
-- when the transaction commits, never for one that rolls back.
CREATE OR REPLACE FUNCTION policyd_ipv6_optin_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('policyd_ipv6_optin', TG_OP);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS policyd_ipv6_optin_changed ON policyd_ipv6_optin;
CREATE TRIGGER policyd_ipv6_optin_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON policyd_ipv6_optin
    FOR EACH STATEMENT EXECUTE FUNCTION policyd_ipv6_optin_notify();
