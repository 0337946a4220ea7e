"""Realistic ORU^R01 laboratory result messages for the HL7 v2 tests: a complete blood count
and a basic metabolic panel with high and low results, as a hospital laboratory system sends
them (segments joined by CR)."""

from __future__ import annotations

from dataclasses import dataclass

MRN = "MRN48213"
AUTHORITY = "STMARY"


@dataclass(frozen=True)
class Analyte:
    loinc: str
    name: str
    value: str
    units: str
    range: str
    flag: str


CBC = (
    Analyte("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "11.8", "x10E3/uL",
            "4.5-11.0", "H"),
    Analyte("789-8", "Erythrocytes [#/volume] in Blood by Automated count", "4.52", "x10E6/uL",
            "4.20-5.40", "N"),
    Analyte("718-7", "Hemoglobin [Mass/volume] in Blood", "11.1", "g/dL", "12.0-15.5", "L"),
    Analyte("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "35.2", "%",
            "36.0-46.0", "L"),
    Analyte("787-2", "MCV [Entitic volume] by Automated count", "88.1", "fL", "80-100", "N"),
    Analyte("777-3", "Platelets [#/volume] in Blood by Automated count", "250", "x10E3/uL",
            "150-400", ""),
)  # fmt: skip

BMP = (
    Analyte("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "182", "mg/dL", "70-99", "H"),
    Analyte("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "18", "mg/dL", "6-20",
            "N"),
    Analyte("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "1.02", "mg/dL",
            "0.57-1.00", "H"),
    Analyte("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "139", "mmol/L", "136-145",
            "N"),
    Analyte("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "3.2", "mmol/L", "3.5-5.1",
            "L"),
    Analyte("2075-0", "Chloride [Moles/volume] in Serum or Plasma", "101", "mmol/L", "98-107",
            "N"),
    Analyte("2028-9", "Carbon dioxide, total [Moles/volume] in Serum or Plasma", "24", "mmol/L",
            "22-29", "N"),
    Analyte("17861-6", "Calcium [Mass/volume] in Serum or Plasma", "9.4", "mg/dL", "8.6-10.3",
            "N"),
)  # fmt: skip


def oru(
    control_id: str,
    analytes: tuple[Analyte, ...] = CBC,
    *,
    panel: tuple[str, str] = ("58410-2", "CBC panel - Blood by Automated count"),
    filler: str = "LAB-20261101-0042",
    placer: str = "ORD-778812",
    mrn: str = MRN,
    authority: str = AUTHORITY,
    status: str = "F",
    message_type: str = "ORU^R01^ORU_R01",
    version: str = "2.5.1",
    processing: str = "P",
    values: dict[str, str] | None = None,
    section: str = "HM",
) -> str:
    """An ORU^R01 with one order; `values` replaces results by LOINC code."""
    values = values or {}
    pid3 = f"{mrn}^^^{authority}^MR" if authority else mrn
    segments = [
        f"MSH|^~\\&|COBAS_LIS|STMARY_LAB|MEDLEDGER|ST_MARY|20261101093000-0500||{message_type}"
        f"|{control_id}|{processing}|{version}||||||UNICODE UTF-8",
        f"PID|1||{pid3}~123-45-6789^^^SSA^SS||Rivera^Ana^M||19780312|F|||"
        "12 Elm St^^Springfield^IL^62701",
        "PV1|1|O|OPD^^^ST_MARY||||1234^Okafor^Chidi^^^MD",
        f"ORC|RE|{placer}^EPIC|{filler}^COBAS_LIS||CM",
        f"OBR|1|{placer}^EPIC|{filler}^COBAS_LIS|{panel[0]}^{panel[1]}^LN|||20261101071500-0500"
        f"|||||||||1234^Okafor^Chidi^^^MD||||||20261101092800-0500||{section}|{status}",
    ]
    for number, a in enumerate(analytes, 1):
        value = values.get(a.loinc, a.value)
        segments.append(
            f"OBX|{number}|NM|{a.loinc}^{a.name}^LN||{value}|{a.units}|{a.range}|{a.flag}|||"
            f"{status}|||20261101084500-0500"
        )
    if analytes:
        segments.append(f"NTE|1|L|Result verified by {a.name.split()[0]} repeat analysis.")
    return "\r".join(segments) + "\r"


def bmp(control_id: str, **kwargs: object) -> str:
    return oru(
        control_id,
        BMP,
        panel=("51990-0", "Basic metabolic panel - Blood"),
        filler="LAB-20261101-0043",
        placer="ORD-778813",
        section="CH",
        **kwargs,  # type: ignore[arg-type]
    )
