-- A currency per wallet (docs/API.md, "Currencies"): its code and its exponent (the number
-- of decimals of its minor unit), fixed at creation. Balances and amounts stay bigint minor
-- units of that currency; the bounds in minor units are unchanged (engine/money.py).
--
-- Wallets created before this migration were two-decimal wallets of an unnamed currency:
-- they become USD with exponent 2 (the default of the default currency). ADD COLUMN with a
-- constant default rewrites nothing (PostgreSQL 11+).

ALTER TABLE wallets
    ADD COLUMN currency text     NOT NULL DEFAULT 'USD',
    ADD COLUMN exponent smallint NOT NULL DEFAULT 2,
    ADD CONSTRAINT wallets_currency_code CHECK (currency ~ '^[A-Z][A-Z0-9]{1,11}$'),
    ADD CONSTRAINT wallets_exponent_range CHECK (exponent BETWEEN 0 AND 18);

-- The currency of the wallets a batch creates, called in the same statement as
-- walletd_append_batch (right after it, so its rows exist): one implicit transaction. It is
-- called with the batch's new wallets only, so a committed currency never changes.
CREATE FUNCTION walletd_set_currencies(ids uuid[], codes text[], exponents smallint[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    set_count bigint;
BEGIN
    UPDATE wallets AS w
       SET currency = c.code, exponent = c.exponent
      FROM unnest(ids, codes, exponents) AS c(id, code, exponent)
     WHERE w.id = c.id;
    GET DIAGNOSTICS set_count = ROW_COUNT;
    IF set_count <> coalesce(cardinality(ids), 0) THEN
        RAISE EXCEPTION 'walletd: % of % new wallets got their currency', set_count,
            cardinality(ids) USING ERRCODE = 'WDC01';
    END IF;
END;
$$;
