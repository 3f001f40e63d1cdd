-- A transfer whose debit is refused (409 INSUFFICIENT_FUNDS) is recorded like a keyed
-- withdrawal's refusal: one wallet_refusals row under the debit leg's key
-- ("<US>TRANSFER_OUT:transfer-id"), fenced by the seq it rests on like any refusal, so a
-- retry of the transfer's id or key gets the original 409 also after money arrived and
-- after a restart (docs/ARCHITECTURE.md, "Transfers"). Only the allowed kinds change.

ALTER TABLE wallet_refusals DROP CONSTRAINT wallet_refusals_kind;
ALTER TABLE wallet_refusals ADD CONSTRAINT wallet_refusals_kind CHECK (kind IN (1, 2, 3));
