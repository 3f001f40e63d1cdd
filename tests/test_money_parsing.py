"""Property tests of the amount parser: exact, total (never raises), and strict.

The parser is driven exactly as the server drives it for a wallet of the default currency
(USD, two decimals): raw body bytes → parse_json_object → parse_amount(value, raw), then
the wallet's rescaling (engine/money.py to_minor, within the bounds) and its 422
(http/responses.py amount_problem). No float ever decides an amount.
"""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from walletd.engine.bounds import storable_amount
from walletd.engine.money import AMOUNT_MINOR_MAX, SEED_CURRENCY, format_minor, to_minor
from walletd.http.parsing import Amount, parse_amount, parse_json_object
from walletd.http.problems import ProblemError
from walletd.http.responses import amount_problem

PROPERTY_SETTINGS: Final = settings(max_examples=300, deadline=None)

minor_amounts = st.integers(min_value=1, max_value=AMOUNT_MINOR_MAX)


def in_usd(parsed: Amount | dict[str, str]) -> int | dict[str, str]:
    """An amount as a USD wallet takes it (minor units), or the field error it answers."""
    if isinstance(parsed, dict):
        return parsed
    minor = to_minor(parsed.value, parsed.scale, SEED_CURRENCY.exponent)
    if minor is None or not storable_amount(minor):
        errors = (amount_problem(SEED_CURRENCY, parsed).extra or {})["errors"]
        assert isinstance(errors, list)
        error: dict[str, str] = errors[0]
        return error
    return minor


def amount_of(raw_value: str) -> int | dict[str, str]:
    """Parse ``{"amount": <raw_value>}`` the way the server parses a request body, for a
    wallet in USD."""
    raw = b'{"amount": ' + raw_value.encode() + b"}"
    return in_usd(parse_amount(parse_json_object(raw)["amount"], raw))


def decimal_texts(minor: int) -> list[str]:
    """Ways a client may write this amount: with 2, 1 or 0 decimals, and trailing zeros."""
    text = format_minor(minor)
    units, cents = text.split(".")
    forms = [text, text + "0"]
    if cents.endswith("0"):
        forms.append(f"{units}.{cents[0]}")
    if cents == "00":
        forms.append(units)
    return forms


@PROPERTY_SETTINGS
@given(minor_amounts)
@example(1)
@example(AMOUNT_MINOR_MAX)
@example(10)  # 0.10: a float that is not exact in binary
def test_valid_amounts_round_trip_exactly(minor: int) -> None:
    """Every valid amount, as a JSON number or a decimal string, parses to its exact cents."""
    for text in decimal_texts(minor):
        assert amount_of(text) == minor, text
        assert amount_of(json.dumps(text)) == minor, text


@PROPERTY_SETTINGS
@given(minor_amounts, st.integers(min_value=1, max_value=6))
def test_exponent_forms_that_keep_two_decimals_are_exact(minor: int, shift: int) -> None:
    """``1050e-2`` is 10.50: an exponent is fine as long as it hides no third decimal."""
    mantissa = Decimal(minor).scaleb(shift - 2)  # minor/100 == mantissa * 10^-shift
    assert amount_of(f"{mantissa:f}e-{shift}") == minor


@PROPERTY_SETTINGS
@given(minor_amounts, minor_amounts, st.data())
def test_sums_are_exact(a: int, b: int, data: st.DataObject) -> None:
    """Two amounts, each written as a client may write it (a JSON number or a decimal
    string, with 0 to 2 decimals), parse to cents that add up exactly like the decimals
    that were written: 0.1 + 0.2 == 0.30, and so does every other pair."""
    texts = [data.draw(st.sampled_from(decimal_texts(minor))) for minor in (a, b)]
    raws = [json.dumps(text) if data.draw(st.booleans()) else text for text in texts]
    left, right = amount_of(raws[0]), amount_of(raws[1])
    assert isinstance(left, int), raws[0]
    assert isinstance(right, int), raws[1]
    assert Decimal(format_minor(left + right)) == Decimal(texts[0]) + Decimal(texts[1])


def test_point_one_plus_point_two_is_point_three() -> None:
    """The classic float trap, sent as JSON numbers: 0.1 + 0.2 is exactly 0.30."""
    left, right = amount_of("0.1"), amount_of("0.2")
    assert isinstance(left, int)
    assert isinstance(right, int)
    assert format_minor(left + right) == "0.30"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)

# Long enough to pass the 28 digits of Decimal's default context in the mantissa.
number_texts = st.from_regex(r"\A-?[0-9]{1,40}(\.[0-9]{0,60})?([eE][-+]?[0-9]{1,4})?\Z")


def _is_valid_amount(value: Decimal) -> bool:
    # Fractions, not Decimal arithmetic: the decimal context rounds to 28 digits, and an
    # oracle that rounds like the parser cannot catch the parser rounding.
    if not value.is_finite():
        return False
    exact = Fraction(value)
    return 0 < exact <= AMOUNT_MINOR_MAX / Fraction(100) and (exact * 100).denominator == 1


def _check_total(raw_value: str) -> None:
    """parse_amount either returns the exact cents of a valid amount or a field error."""
    raw = b'{"amount": ' + raw_value.encode() + b"}"
    refusal: ProblemError | None
    try:
        body = parse_json_object(raw)
    except ProblemError as error:  # the body itself was not JSON: a 400, also not a crash
        refusal = error
    else:
        refusal = None
    if refusal is not None:
        assert refusal.status == 400
        return
    result = in_usd(parse_amount(body["amount"], raw))
    if isinstance(result, dict):
        assert result["field"] == "amount"
        assert result["message"]
        return
    exact = json.loads(raw_value, parse_float=Decimal, parse_int=Decimal)
    if isinstance(exact, str):
        exact = Decimal(exact)
    assert isinstance(exact, Decimal), raw_value
    assert _is_valid_amount(exact), raw_value
    assert Fraction(result, 100) == Fraction(exact), raw_value


@PROPERTY_SETTINGS
@given(json_values)
def test_any_json_value_is_an_amount_or_a_field_error(value: Any) -> None:
    """Any JSON value (booleans, null, NaN, ±Infinity, nested, huge) never raises."""
    _check_total(json.dumps(value))


@PROPERTY_SETTINGS
@given(number_texts)
@example("1e-999999999")
@example("1e999999999")
@example("9" * 25 + "e-23")
@example("-0.00")
@example("0.001e1")
@example("10.009999999999999999999999999")
@example("1000.999999999999999999999999999e-2")
def test_any_number_literal_is_exact_or_refused(text: str) -> None:
    """Any JSON number literal (signs, exponents, long fractions) is exact or refused."""
    _check_total(text)
    _check_total(json.dumps(text))  # and the same text as a string


@PROPERTY_SETTINGS
@given(st.text(max_size=40))
@example("")
@example(" 1")
@example("1 ")
@example("٣")  # an Arabic-Indic digit: Decimal() would accept it
@example("1_000")
@example("0x10")
@example("Infinity")
def test_any_string_is_an_exact_decimal_or_refused(text: str) -> None:
    """A string amount is a plain ASCII decimal or a field error, never an exception."""
    _check_total(json.dumps(text))


def _written_forms(digits: str, point: int) -> list[str]:
    """``digits`` with a decimal point after ``point`` of them, written as a plain decimal
    and in exponent forms that move the point (so the mantissa alone looks harmless)."""
    plain = digits[:point] + "." + digits[point:]
    mantissa = digits.lstrip("0")  # JSON allows no leading zeros
    shift = len(digits) - point
    forms = [plain, mantissa + f"e-{shift}", mantissa + f"E-{shift}"]
    forms.append("0." + digits + f"e{point}")
    forms.append("0." + digits + f"e+{point}")
    return forms


@PROPERTY_SETTINGS
@given(
    minor_amounts,
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=1, max_value=9),
    st.booleans(),
)
@example(1001, 25, 9, False)  # 10.009999999999999999999999999, the reported one
@example(1000, 27, 1, True)  # 10.000000000000000000000000001
def test_a_nonzero_digit_past_the_second_decimal_is_refused_however_written(
    minor: int, extra_digits: int, last_digit: int, above: bool
) -> None:
    """An amount 10^-(2+extra_digits) away from a valid one (above it, or below it as in
    10.00999...9) is 422 as a JSON number, a decimal string and in exponent forms, however
    many digits it takes: the decimal context must never round it onto the valid amount."""
    exact = Fraction(minor, 100) + (1 if above else -1) * Fraction(
        last_digit, 10 ** (2 + extra_digits)
    )
    if exact <= 0:
        return
    scale = 10 ** (2 + extra_digits)
    digits = str(exact.numerator * (scale // exact.denominator))
    integer_digits = len(digits) - (2 + extra_digits)
    if integer_digits <= 0:
        digits = "0" * (1 - integer_digits) + digits
        integer_digits = 1
    for text in _written_forms(digits, integer_digits):
        assert Fraction(Decimal(text)) == exact, text  # the test writes what it means
        assert isinstance(amount_of(text), dict), text
    assert isinstance(amount_of(json.dumps(_written_forms(digits, integer_digits)[0])), dict)


@pytest.mark.parametrize(
    ("raw_value", "message"),
    [
        ("true", "number or a decimal string"),
        ("null", "number or a decimal string"),
        ("NaN", "number or a decimal string"),
        ('""', "decimal string"),
        ("0", "greater than 0"),
        ("1.001", "2 fractional digits"),
        ("1e-3", "2 fractional digits"),
        # Past any currency's 18 decimals: refused at the edge already.
        ("10.009999999999999999999999999", "18 fractional digits"),
        ('"10.009999999999999999999999999"', "18 fractional digits"),
        ("1000999999999999999999999999999e-29", "18 fractional digits"),
        ("1000000000000.01", "at most 1000000000000.00"),
        ("1e400", "at most"),
        ("[1]", "number or a decimal string"),
    ],
)
def test_refusals_say_why(raw_value: str, message: str) -> None:
    """Each kind of bad amount gets a message that names the rule it broke."""
    result = amount_of(raw_value)
    assert isinstance(result, dict)
    assert message in result["message"]
