-- A transfer whose debit is refused (409 INSUFFICIENT_FUNDS), and a keyed hold creation
-- refused for the same reason, are recorded like a keyed withdrawal's refusal: one
-- wallet_refusals row under the debit leg's key ("<US>TRANSFER_OUT:transfer-id") or the
-- hold's HOLD row key, fenced by the seq it rests on like any refusal, so a retry with the
-- same id or key gets the original 409 also after money arrived and after a restart
-- (docs/API.md, "Transfers" and "Holds"). Only the allowed kinds change.

ALTER TABLE wallet_refusals DROP CONSTRAINT wallet_refusals_kind;
ALTER TABLE wallet_refusals ADD CONSTRAINT wallet_refusals_kind CHECK (kind IN (1, 2, 3, 6));
