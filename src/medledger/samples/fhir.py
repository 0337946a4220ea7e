"""Realistic, reproducible FHIR R4 clinical resources for demos, tests and benchmarks.

Everything here is synthetic: no real person's data. A record set is one patient's chart extract
over the year before a given instant, the way a primary-care EHR would hold it: a problem list
(SNOMED CT), the prescriptions that treat it (RxNorm), allergies, vaccinations (CVX), ambulatory
visits with vital signs, and laboratory results (LOINC, UCUM units) whose values follow the
patient's conditions and whose interpretation flags agree with their reference ranges.

The same seed (and the same arguments) always gives the same output: every draw comes from one
`random.Random(seed)`, every id is a name-based UUID (version 5), and nothing reads the clock.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

Resource = dict[str, Any]

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
TERMINOLOGY = "http://terminology.hl7.org/CodeSystem"

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medledger:samples:fhir")


# --- Code tables -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lab:
    """A LOINC laboratory test with its UCUM unit and adult reference interval.

    `low` or `high` is None for a one-sided interval (e.g. LDL below 100 mg/dL); `typical` is the
    span healthy values are drawn from when the interval is one-sided.
    """

    code: str
    display: str
    short: str
    unit: str
    low: float | None
    high: float | None
    decimals: int
    typical: tuple[float, float] | None = None


LABS: dict[str, Lab] = {
    lab.code: lab
    for lab in (
        Lab("2345-7", "Glucose [Mass/volume] in Serum or Plasma",
            "Glucose", "mg/dL", 70, 99, 0),
        Lab("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood",
            "HbA1c", "%", 4.0, 5.6, 1),
        Lab("2160-0", "Creatinine [Mass/volume] in Serum or Plasma",
            "Creatinine", "mg/dL", 0.6, 1.2, 2),
        Lab("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma",
            "BUN", "mg/dL", 7, 20, 0),
        Lab("2951-2", "Sodium [Moles/volume] in Serum or Plasma",
            "Sodium", "mmol/L", 136, 145, 0),
        Lab("2823-3", "Potassium [Moles/volume] in Serum or Plasma",
            "Potassium", "mmol/L", 3.5, 5.1, 1),
        Lab("2075-0", "Chloride [Moles/volume] in Serum or Plasma",
            "Chloride", "mmol/L", 98, 107, 0),
        Lab("2028-9", "Carbon dioxide, total [Moles/volume] in Serum or Plasma",
            "CO2", "mmol/L", 22, 29, 0),
        Lab("17861-6", "Calcium [Mass/volume] in Serum or Plasma",
            "Calcium", "mg/dL", 8.6, 10.3, 1),
        Lab("718-7", "Hemoglobin [Mass/volume] in Blood",
            "Hemoglobin", "g/dL", 12.0, 17.5, 1),
        Lab("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count",
            "Hematocrit", "%", 36, 50, 1),
        Lab("6690-2", "Leukocytes [#/volume] in Blood by Automated count",
            "WBC", "10*3/uL", 4.5, 11.0, 1),
        Lab("777-3", "Platelets [#/volume] in Blood by Automated count",
            "Platelets", "10*3/uL", 150, 400, 0),
        Lab("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma",
            "Total cholesterol", "mg/dL", None, 199, 0, (140, 195)),
        Lab("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma",
            "Triglycerides", "mg/dL", None, 149, 0, (60, 145)),
        Lab("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma",
            "HDL cholesterol", "mg/dL", 40, None, 0, (42, 78)),
        Lab("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
            "LDL cholesterol", "mg/dL", None, 99, 0, (62, 98)),
        Lab("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma",
            "TSH", "m[IU]/L", 0.4, 4.0, 2),
    )
}  # fmt: skip

# Intervals that differ by sex replace the table's (low, high).
SEX_SPECIFIC_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "718-7": {"female": (12.0, 15.5), "male": (13.5, 17.5)},
    "4544-3": {"female": (36.0, 46.0), "male": (41.0, 53.0)},
    "2160-0": {"female": (0.5, 1.1), "male": (0.7, 1.3)},
}


@dataclass(frozen=True)
class Panel:
    code: str
    display: str
    members: tuple[str, ...]


PANELS: dict[str, Panel] = {
    panel.code: panel
    for panel in (
        Panel(
            "51990-0",
            "Basic metabolic panel - Blood",
            ("2345-7", "3094-0", "2160-0", "2951-2", "2823-3", "2075-0", "2028-9", "17861-6"),
        ),
        Panel(
            "57698-3",
            "Lipid panel with direct LDL - Serum or Plasma",
            ("2093-3", "2571-8", "2085-9", "18262-6"),
        ),
        Panel(
            "58410-2",
            "CBC panel - Blood by Automated count",
            ("6690-2", "718-7", "4544-3", "777-3"),
        ),
    )
}

BP_PANEL = ("85354-9", "Blood pressure panel with all children optional", "Blood pressure")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")

# LOINC code -> (display, short name, UCUM unit); taken in this order at each visit.
VITALS: dict[str, tuple[str, str, str]] = {
    BP_PANEL[0]: (BP_PANEL[1], BP_PANEL[2], "mm[Hg]"),
    "8867-4": ("Heart rate", "Heart rate", "/min"),
    "9279-1": ("Respiratory rate", "Respiratory rate", "/min"),
    "8310-5": ("Body temperature", "Temperature", "Cel"),
    "59408-5": ("Oxygen saturation in Arterial blood by Pulse oximetry", "SpO2", "%"),
    "29463-7": ("Body weight", "Weight", "kg"),
    "8302-2": ("Body height", "Height", "cm"),
    "39156-5": ("Body mass index (BMI) [Ratio]", "BMI", "kg/m2"),
}


@dataclass(frozen=True)
class Medication:
    """An RxNorm clinical drug and the usual outpatient prescription for it."""

    code: str
    display: str
    sig: str
    per_day: int
    as_needed: bool = False
    inhaler: bool = False


MEDICATIONS: dict[str, Medication] = {
    "metformin": Medication(
        "860975",
        "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
        "Take 1 tablet by mouth once daily with the evening meal.",
        1,
    ),
    "lisinopril": Medication(
        "314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth once daily.", 1
    ),
    "amlodipine": Medication(
        "197361", "amlodipine 5 MG Oral Tablet", "Take 1 tablet by mouth once daily.", 1
    ),
    "hydrochlorothiazide": Medication(
        "310798",
        "hydrochlorothiazide 25 MG Oral Tablet",
        "Take 1 tablet by mouth once daily in the morning.",
        1,
    ),
    "atorvastatin": Medication(
        "617314",
        "atorvastatin 10 MG Oral Tablet [Lipitor]",
        "Take 1 tablet by mouth once daily at bedtime.",
        1,
    ),
    "levothyroxine": Medication(
        "966222",
        "levothyroxine sodium 0.075 MG Oral Tablet",
        "Take 1 tablet by mouth every morning on an empty stomach, 30 minutes before breakfast.",
        1,
    ),
    "albuterol": Medication(
        "745752",
        "NDA021457 200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler [ProAir]",
        "Inhale 2 puffs by mouth every 4 to 6 hours as needed for wheezing or shortness of breath.",
        6,
        as_needed=True,
        inhaler=True,
    ),
    "fluticasone": Medication(
        "895994",
        "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
        "Inhale 2 puffs by mouth twice daily. Rinse mouth with water after each use.",
        2,
        inhaler=True,
    ),
}


@dataclass(frozen=True)
class ConditionSpec:
    """A chronic problem: its SNOMED CT code, how common it is among our synthetic patients,
    the drugs that treat it (one is prescribed), the lab values it shifts and the procedures it
    occasionally brings."""

    code: str
    display: str
    text: str
    prevalence: float
    medications: tuple[str, ...] = ()
    lab_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    procedures: tuple[str, ...] = ()


CONDITIONS: dict[str, ConditionSpec] = {
    "hypertension": ConditionSpec(
        "38341003",
        "Hypertensive disorder, systemic arterial",
        "Hypertension",
        0.35,
        ("lisinopril", "amlodipine", "hydrochlorothiazide"),
        procedures=("ecg",),
    ),
    "diabetes": ConditionSpec(
        "44054006",
        "Type 2 diabetes mellitus",
        "Type 2 diabetes",
        0.2,
        ("metformin",),
        {"2345-7": (112, 214), "4548-4": (6.4, 9.6)},
    ),
    "hyperlipidemia": ConditionSpec(
        "55822004",
        "Hyperlipidemia",
        "High cholesterol",
        0.25,
        ("atorvastatin",),
        {"18262-6": (118, 188), "2093-3": (196, 272), "2571-8": (135, 280)},
    ),
    "asthma": ConditionSpec(
        "195967001",
        "Asthma",
        "Asthma",
        0.12,
        ("albuterol", "fluticasone"),
        procedures=("spirometry",),
    ),
    "hypothyroidism": ConditionSpec(
        "40930008",
        "Hypothyroidism",
        "Hypothyroidism",
        0.1,
        ("levothyroxine",),
        {"3016-3": (3.1, 8.8)},
    ),
    "ckd": ConditionSpec(
        "709044004",
        "Chronic kidney disease",
        "Chronic kidney disease",
        0.08,
        ("lisinopril",),
        {"2160-0": (1.35, 2.4), "2823-3": (4.6, 5.6), "3094-0": (21, 39)},
    ),
    "obesity": ConditionSpec("414916001", "Obesity", "Obesity", 0.15),
}


@dataclass(frozen=True)
class AllergySpec:
    code: str
    display: str
    category: str
    reactions: tuple[tuple[str, str], ...]


ALLERGIES: tuple[AllergySpec, ...] = (
    AllergySpec(
        "91936005",
        "Allergy to penicillin",
        "medication",
        (("247472004", "Wheal"), ("271807003", "Eruption of skin"), ("39579001", "Anaphylaxis")),
    ),
    AllergySpec(
        "91935009",
        "Allergy to peanuts",
        "food",
        (("247472004", "Wheal"), ("418290006", "Itching of skin"), ("39579001", "Anaphylaxis")),
    ),
    AllergySpec(
        "232350006",
        "House dust mite allergy",
        "environment",
        (("76067001", "Sneezing"), ("68235000", "Nasal congestion"), ("49727002", "Cough")),
    ),
    AllergySpec(
        "300916003",
        "Latex allergy",
        "environment",
        (("40275004", "Contact dermatitis"), ("247472004", "Wheal")),
    ),
)

# CVX code -> (display, plain name, dose in mL, probability a patient had it this year).
VACCINES: dict[str, tuple[str, str, float, float]] = {
    "140": (
        "Influenza, seasonal, injectable, preservative free",
        "Influenza vaccine",
        0.5,
        0.8,
    ),
    "208": (
        "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, "
        "30 mcg/0.3mL dose",
        "COVID-19 vaccine",
        0.3,
        0.5,
    ),
    "115": ("Tdap", "Tdap vaccine", 0.5, 0.15),
    "187": ("zoster recombinant", "Shingles vaccine (recombinant)", 0.5, 0.15),
    "33": ("pneumococcal polysaccharide PPV23", "Pneumococcal vaccine", 0.5, 0.1),
}

# key -> (SNOMED code, display, reason (SNOMED code, display) or None, typical note).
PROCEDURES: dict[str, tuple[str, str, tuple[str, str] | None, str]] = {
    "colonoscopy": (
        "73761001",
        "Colonoscopy",
        ("275978004", "Screening for malignant neoplasm of colon"),
        "Cecum reached; good bowel preparation. No polyps seen. Repeat screening in 10 years.",
    ),
    "ecg": (
        "29303009",
        "Electrocardiographic procedure",
        None,
        "Normal sinus rhythm. No ST-segment changes. No evidence of left ventricular hypertrophy.",
    ),
    "spirometry": (
        "23426006",
        "Measurement of respiratory function",
        None,
        "FEV1/FVC 0.74 before bronchodilator, with 13% improvement in FEV1 after albuterol.",
    ),
}

ENCOUNTER_TYPES = {
    "check-up": ("185349003", "Encounter for check up"),
    "follow-up": ("390906007", "Follow-up encounter"),
}

GIVEN_NAMES = {
    "female": ("Maria", "Emily", "Aisha", "Grace", "Sofia", "Hannah", "Mei", "Olivia", "Fatima",
               "Laura", "Nora", "Priya", "Elena", "Chloe", "Amara", "Julia"),
    "male": ("James", "Daniel", "Omar", "Lucas", "Wei", "Michael", "Samuel", "Mateo", "Ethan",
             "Arjun", "Thomas", "David", "Kwame", "Leon", "Noah", "Adrian"),
}  # fmt: skip
FAMILY_NAMES = ("Garcia", "Smith", "Nguyen", "Okafor", "Johnson", "Müller", "Rossi", "Kowalski",
                "Chen", "Patel", "Brown", "Haddad", "Silva", "Andersen", "Martin", "Kim",
                "Williams", "Novak", "Dubois", "O'Brien", "Schmidt", "Ivanova", "Tanaka",
                "Lopez")  # fmt: skip
STREETS = ("Maple Avenue", "Oak Street", "Elm Street", "Harbor Road", "Mill Lane", "Park Avenue",
           "Cedar Court", "Church Street", "Lakeview Drive", "Willow Way",
           "High Street")  # fmt: skip
CITIES = (("Riverside", "MA", "01"), ("Fairview", "NY", "12"), ("Greenville", "OH", "45"),
          ("Franklin", "TN", "37"), ("Madison", "WI", "53"), ("Salem", "OR", "97"))  # fmt: skip

# A laboratory comment, in the order things happen to a specimen.
LAB_NOTE_SENTENCES = (
    "Specimen collected by venipuncture from the left antecubital vein at {time}.",
    "Patient reported fasting for {hours} hours before collection.",
    "Sample received in the laboratory {minutes} minutes after collection.",
    "Specimen centrifuged and serum separated within {small} minutes of receipt.",
    "No hemolysis, lipemia or icterus observed on visual inspection.",
    "Analyzed after the morning quality control run passed at {levels} levels.",
    "Calibration verified against traceable reference material earlier the same day.",
    "Current medications reviewed at collection; no known interfering substances reported.",
    "Result verified by repeat analysis on the same specimen; difference {pct}%.",
    "Delta check passed; no sample identification issues detected.",
    "Compared with the previous result, the change is within expected biological variation.",
    "Reference interval applies to adults; interpret together with the clinical picture.",
    "Result released by the clinical chemistry section after technical validation.",
    "Specimen retained at 2 to 8 degrees Celsius for {days} days for add-on testing.",
)


# --- Small builders ----------------------------------------------------------------------------


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def _concept(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [_coding(system, code, display)]}
    if text:
        concept["text"] = text
    return concept


def _ref(reference: str) -> dict[str, Any]:
    return {"reference": reference}


# How a UCUM code is shown to people, where that differs from the code.
UNIT_DISPLAY = {"mm[Hg]": "mmHg", "Cel": "C", "m[IU]/L": "mIU/L"}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": UNIT_DISPLAY.get(unit, unit), "system": UCUM, "code": unit}


def _timestamp(moment: datetime) -> str:
    """FHIR dateTime/instant to the second; UTC is written as Z, as the FHIR models write it."""
    text = moment.isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _round(value: float, decimals: int) -> float:
    return round(value) if decimals == 0 else round(value, decimals)


def _parse_when(when: str | datetime) -> datetime:
    moment = datetime.fromisoformat(when) if isinstance(when, str) else when
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _category(system_suffix: str, code: str, display: str) -> list[dict[str, Any]]:
    return [_concept(f"{TERMINOLOGY}/{system_suffix}", code, display)]


def canonical_json(resource: Resource) -> bytes:
    """Compact JSON with sorted keys, UTF-8: the form whose size `sized_observation` targets."""
    return json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def reference_range(lab: Lab, sex: str | None = None) -> tuple[float | None, float | None]:
    """The lab's (low, high) reference interval, by sex where the interval differs by sex."""
    by_sex = SEX_SPECIFIC_RANGES.get(lab.code, {})
    if sex in by_sex:
        return by_sex[sex]
    return lab.low, lab.high


def interpretation(value: float, low: float | None, high: float | None) -> str:
    """v3 ObservationInterpretation: L below the low bound, H above the high bound, else N."""
    if low is not None and value < low:
        return "L"
    if high is not None and value > high:
        return "H"
    return "N"


_INTERPRETATION_DISPLAY = {"L": "Low", "H": "High", "N": "Normal"}


def _lab_value(
    rng: random.Random,
    lab: Lab,
    low: float | None,
    high: float | None,
    shifted: tuple[float, float] | None,
) -> float:
    """A result: from the condition's range if the patient has one, else mostly normal, with an
    occasional mild excursion past a bound."""
    if shifted is not None:
        return _round(rng.uniform(*shifted), lab.decimals)
    if low is not None and high is not None:
        width = high - low
        lo, hi = low + 0.1 * width, high - 0.1 * width
    else:
        assert lab.typical is not None
        lo, hi = lab.typical
        width = hi - lo
    if rng.random() < 0.1:
        if high is not None and (low is None or rng.random() < 0.6):
            return _round(rng.uniform(high, high + 0.15 * width), lab.decimals)
        if low is not None:
            return _round(rng.uniform(max(low - 0.15 * width, 0.0), low), lab.decimals)
    return _round(rng.uniform(lo, hi), lab.decimals)


def _lab_observation(
    obs_id: str,
    lab: Lab,
    value: float,
    sex: str | None,
    subject: str,
    performer: str,
    effective: datetime,
    issued: datetime,
) -> Resource:
    low, high = reference_range(lab, sex)
    flag = interpretation(value, low, high)
    ref_range: dict[str, Any] = {}
    if low is not None:
        ref_range["low"] = _quantity(low, lab.unit)
    if high is not None:
        ref_range["high"] = _quantity(high, lab.unit)
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "category": _category("observation-category", "laboratory", "Laboratory"),
        "code": _concept(LOINC, lab.code, lab.display, lab.short),
        "subject": _ref(subject),
        "effectiveDateTime": _timestamp(effective),
        "issued": _timestamp(issued),
        "performer": [_ref(performer)],
        "valueQuantity": _quantity(value, lab.unit),
        "interpretation": [
            _concept(
                f"{TERMINOLOGY}/v3-ObservationInterpretation", flag, _INTERPRETATION_DISPLAY[flag]
            )
        ],
        "referenceRange": [ref_range],
    }


# --- One patient's chart -----------------------------------------------------------------------


@dataclass
class _Group:
    """Resources that belong together (a panel's results and its report) and their date."""

    moment: datetime
    resources: list[Resource]


@dataclass
class _Visit:
    moment: datetime
    kind: str
    reason: ConditionSpec | None
    weight: float


class _Chart:
    """Draws one synthetic patient's problems, then hands out their chart entries on demand."""

    def __init__(self, seed: int, patient_ref: str, author_ref: str, when: datetime) -> None:
        self.rng = random.Random(seed)
        self.seed, self.patient, self.author, self.when = seed, patient_ref, author_ref, when
        self.serial = 0
        rng = self.rng
        self.sex = rng.choice(("female", "male"))
        keys = list(CONDITIONS)
        n_conditions = rng.choices((1, 2, 3), weights=(0.45, 0.35, 0.2))[0]
        chosen: list[str] = []
        while len(chosen) < n_conditions:
            key = rng.choices(keys, weights=[CONDITIONS[k].prevalence for k in keys])[0]
            if key not in chosen:
                chosen.append(key)
        self.conditions = [CONDITIONS[k] for k in chosen]
        self.height = rng.gauss(176.0, 7.0) if self.sex == "male" else rng.gauss(163.0, 6.5)
        if CONDITIONS["obesity"] in self.conditions:
            bmi = rng.uniform(31.0, 38.0)
        elif CONDITIONS["diabetes"] in self.conditions:
            bmi = rng.uniform(26.0, 33.0)
        else:
            bmi = rng.uniform(20.5, 29.0)
        self.weight = bmi * (self.height / 100) ** 2
        self.lab_shifts: dict[str, tuple[float, float]] = {}
        for spec in self.conditions:
            self.lab_shifts.update(spec.lab_ranges)

        # Finite entries, prepared in a fixed order so the draws stay reproducible.
        self.pending: dict[str, list[_Group]] = {
            "condition": [],
            "medication": [],
            "allergy": [],
            "immunization": [],
            "procedure": [],
        }
        prescribed: set[str] = set()
        self.diagnosed: list[tuple[ConditionSpec, datetime]] = []
        for spec in self.conditions:
            recorded = self.past_moment()
            self.diagnosed.append((spec, recorded))
            self.pending["condition"].append(self.condition(spec, recorded))
            if spec.medications:
                med = rng.choice(spec.medications)
                if med not in prescribed:
                    prescribed.add(med)
                    self.pending["medication"].append(self.medication_request(med, spec, recorded))
            for proc in spec.procedures:
                if rng.random() < 0.4:
                    self.pending["procedure"].append(self.procedure(proc, spec))
        if rng.random() < 0.15:
            self.pending["procedure"].append(self.procedure("colonoscopy", None))
        n_allergies = rng.choices((0, 1, 2), weights=(0.45, 0.4, 0.15))[0]
        for allergy in rng.sample(ALLERGIES, n_allergies):
            self.pending["allergy"].append(self.allergy(allergy))
        for cvx, (_, _, _, probability) in VACCINES.items():
            if rng.random() < probability:
                self.pending["immunization"].append(self.immunization(cvx))

        # Open-ended entries: visits (with vitals) and lab draws, made as they are asked for.
        self.visits: list[_Visit] = []
        self.encounters_taken = 0
        self.vital_cursor = 0
        relevant = [
            code
            for code, panel in PANELS.items()
            if any(member in self.lab_shifts for member in panel.members)
        ]
        self.panel_order = relevant + [code for code in PANELS if code not in relevant]
        self.panels_taken = 0

    # Identifiers and dates.

    def new_id(self, resource_type: str) -> str:
        self.serial += 1
        name = f"{self.seed}|{self.patient}|{resource_type}|{self.serial}"
        return str(uuid.uuid5(_NAMESPACE, name))

    def clinic_time(self, day: datetime) -> datetime:
        return day.replace(
            hour=self.rng.randint(8, 16),
            minute=5 * self.rng.randint(0, 11),
            second=0,
            microsecond=0,
        )

    def past_moment(self) -> datetime:
        """A moment during clinic hours, between 365 and 2 days before `when`."""
        return self.clinic_time(self.when - timedelta(days=self.rng.randint(2, 365)))

    def flu_season_moment(self) -> datetime:
        """A clinic moment in September to November within the past year (seasonal vaccine)."""
        offsets = [d for d in range(2, 366) if (self.when - timedelta(days=d)).month in (9, 10, 11)]
        return self.clinic_time(self.when - timedelta(days=self.rng.choice(offsets)))

    # Finite entries.

    def condition(self, spec: ConditionSpec, recorded: datetime) -> _Group:
        if self.rng.random() < 0.45:
            onset = _timestamp(recorded)
        else:
            onset = (recorded.date() - timedelta(days=self.rng.randint(365, 12 * 365))).isoformat()
        resource = {
            "resourceType": "Condition",
            "id": self.new_id("Condition"),
            "clinicalStatus": _concept(f"{TERMINOLOGY}/condition-clinical", "active", "Active"),
            "verificationStatus": _concept(
                f"{TERMINOLOGY}/condition-ver-status", "confirmed", "Confirmed"
            ),
            "category": _category("condition-category", "problem-list-item", "Problem List Item"),
            "code": _concept(SNOMED, spec.code, spec.display, spec.text),
            "subject": _ref(self.patient),
            "onsetDateTime": onset,
            "recordedDate": _timestamp(recorded),
            "recorder": _ref(self.author),
        }
        return _Group(recorded, [resource])

    def medication_request(self, key: str, reason: ConditionSpec, diagnosed: datetime) -> _Group:
        med = MEDICATIONS[key]
        days_left = max((self.when - diagnosed).days - 2, 0)
        authored = diagnosed + timedelta(days=self.rng.randint(0, days_left), minutes=15)
        if med.inhaler:
            dose = {"value": 2, "unit": "puff", "system": UCUM, "code": "{puff}"}
            quantity = {"value": 1, "unit": "inhaler"}
            supply_days = 30
        else:
            dose = {
                "value": 1,
                "unit": "tablet",
                "system": f"{TERMINOLOGY}/v3-orderableDrugForm",
                "code": "TAB",
            }
            supply_days = 90
            quantity = {"value": med.per_day * supply_days, "unit": "tablet"}
        route = (
            ("447694001", "Respiratory tract route") if med.inhaler else ("26643006", "Oral route")
        )
        dosage: dict[str, Any] = {
            "sequence": 1,
            "text": med.sig,
            "timing": {"repeat": {"frequency": 1, "period": 4, "periodMax": 6, "periodUnit": "h"}}
            if med.as_needed
            else {"repeat": {"frequency": med.per_day, "period": 1, "periodUnit": "d"}},
            "asNeededBoolean": med.as_needed,
            "route": _concept(SNOMED, *route),
            "doseAndRate": [
                {
                    "type": _concept(f"{TERMINOLOGY}/dose-rate-type", "ordered", "Ordered"),
                    "doseQuantity": dose,
                }
            ],
        }
        resource = {
            "resourceType": "MedicationRequest",
            "id": self.new_id("MedicationRequest"),
            "status": "active",
            "intent": "order",
            "category": _category("medicationrequest-category", "outpatient", "Outpatient"),
            "medicationCodeableConcept": _concept(RXNORM, med.code, med.display),
            "subject": _ref(self.patient),
            "authoredOn": _timestamp(authored),
            "requester": _ref(self.author),
            "reasonCode": [_concept(SNOMED, reason.code, reason.display, reason.text)],
            "courseOfTherapyType": _concept(
                f"{TERMINOLOGY}/medicationrequest-course-of-therapy",
                "continuous",
                "Continuous long term therapy",
            ),
            "dosageInstruction": [dosage],
            "dispenseRequest": {
                "validityPeriod": {
                    "start": authored.date().isoformat(),
                    "end": (authored.date() + timedelta(days=365)).isoformat(),
                },
                "numberOfRepeatsAllowed": 3,
                "quantity": quantity,
                "expectedSupplyDuration": {
                    "value": supply_days,
                    "unit": "days",
                    "system": UCUM,
                    "code": "d",
                },
            },
        }
        return _Group(authored, [resource])

    def allergy(self, spec: AllergySpec) -> _Group:
        recorded = self.past_moment()
        code, display = self.rng.choice(spec.reactions)
        severe = code == "39579001"
        severity = "severe" if severe else self.rng.choice(("mild", "moderate"))
        resource = {
            "resourceType": "AllergyIntolerance",
            "id": self.new_id("AllergyIntolerance"),
            "clinicalStatus": _concept(
                f"{TERMINOLOGY}/allergyintolerance-clinical", "active", "Active"
            ),
            "verificationStatus": _concept(
                f"{TERMINOLOGY}/allergyintolerance-verification", "confirmed", "Confirmed"
            ),
            "type": "allergy",
            "category": [spec.category],
            "criticality": "high" if severe else "low",
            "code": _concept(SNOMED, spec.code, spec.display),
            "patient": _ref(self.patient),
            "onsetDateTime": str(recorded.year - self.rng.randint(2, 30)),
            "recordedDate": _timestamp(recorded),
            "recorder": _ref(self.author),
            "asserter": _ref(self.patient),
            "reaction": [
                {"manifestation": [_concept(SNOMED, code, display)], "severity": severity}
            ],
        }
        return _Group(recorded, [resource])

    def immunization(self, cvx: str) -> _Group:
        display, text, dose_ml, _ = VACCINES[cvx]
        given = self.flu_season_moment() if cvx == "140" else self.past_moment()
        site = self.rng.choice((("LA", "left arm"), ("RA", "right arm")))
        lot = "".join(self.rng.choices("ABCDEFGHJKLMNPRSTUVWXYZ", k=2)) + str(
            self.rng.randint(1000, 9999)
        )
        resource = {
            "resourceType": "Immunization",
            "id": self.new_id("Immunization"),
            "status": "completed",
            "vaccineCode": _concept(CVX, cvx, display, text),
            "patient": _ref(self.patient),
            "occurrenceDateTime": _timestamp(given),
            "recorded": _timestamp(given + timedelta(minutes=10)),
            "primarySource": True,
            "lotNumber": lot,
            "expirationDate": (
                given.date() + timedelta(days=self.rng.randint(90, 300))
            ).isoformat(),
            "site": _concept(f"{TERMINOLOGY}/v3-ActSite", *site),
            "route": _concept(
                f"{TERMINOLOGY}/v3-RouteOfAdministration", "IM", "Injection, intramuscular"
            ),
            "doseQuantity": _quantity(dose_ml, "mL"),
            "performer": [
                {
                    "function": _concept(f"{TERMINOLOGY}/v2-0443", "AP", "Administering Provider"),
                    "actor": _ref(self.author),
                }
            ],
        }
        return _Group(given, [resource])

    def procedure(self, key: str, indication: ConditionSpec | None) -> _Group:
        code, display, reason, note = PROCEDURES[key]
        start = self.past_moment()
        minutes = 35 if key == "colonoscopy" else 15
        if reason is None and indication is not None:
            reason = (indication.code, indication.display)
        resource: Resource = {
            "resourceType": "Procedure",
            "id": self.new_id("Procedure"),
            "status": "completed",
            "category": _concept(SNOMED, "103693007", "Diagnostic procedure"),
            "code": _concept(SNOMED, code, display),
            "subject": _ref(self.patient),
            "performedPeriod": {
                "start": _timestamp(start),
                "end": _timestamp(start + timedelta(minutes=minutes)),
            },
            "recorder": _ref(self.author),
            "performer": [{"actor": _ref(self.author)}],
            "note": [{"text": note}],
        }
        if reason is not None:
            resource["reasonCode"] = [_concept(SNOMED, *reason)]
        return _Group(start, [resource])

    # Open-ended entries.

    def visit(self, index: int) -> _Visit:
        """The index-th visit: a check-up, or (after the first, mostly) a follow-up of a problem
        already on the list by the visit's date."""
        while len(self.visits) <= index:
            moment = self.past_moment()
            known = [spec for spec, recorded in self.diagnosed if recorded <= moment]
            reason = None
            if self.visits and known and self.rng.random() < 0.7:
                reason = self.rng.choice(known)
            weight = self.weight + self.rng.uniform(-1.5, 1.5)
            self.visits.append(
                _Visit(moment, "follow-up" if reason else "check-up", reason, weight)
            )
        return self.visits[index]

    def encounter(self) -> _Group:
        visit = self.visit(self.encounters_taken)
        self.encounters_taken += 1
        code, display = ENCOUNTER_TYPES[visit.kind]
        resource: Resource = {
            "resourceType": "Encounter",
            "id": self.new_id("Encounter"),
            "status": "finished",
            "class": _coding(f"{TERMINOLOGY}/v3-ActCode", "AMB", "ambulatory"),
            "type": [_concept(SNOMED, code, display)],
            "subject": _ref(self.patient),
            "participant": [
                {
                    "type": [
                        _concept(f"{TERMINOLOGY}/v3-ParticipationType", "PPRF", "primary performer")
                    ],
                    "individual": _ref(self.author),
                }
            ],
            "period": {
                "start": _timestamp(visit.moment),
                "end": _timestamp(visit.moment + timedelta(minutes=self.rng.choice((20, 30, 40)))),
            },
        }
        if visit.reason is not None:
            resource["reasonCode"] = [
                _concept(SNOMED, visit.reason.code, visit.reason.display, visit.reason.text)
            ]
        return _Group(visit.moment, [resource])

    def vital_sign(self) -> _Group:
        codes = list(VITALS)
        visit = self.visit(self.vital_cursor // len(codes))
        code = codes[self.vital_cursor % len(codes)]
        self.vital_cursor += 1
        display, short, unit = VITALS[code]
        moment = visit.moment + timedelta(minutes=5)
        resource: Resource = {
            "resourceType": "Observation",
            "id": self.new_id("Observation"),
            "status": "final",
            "category": _category("observation-category", "vital-signs", "Vital Signs"),
            "code": _concept(LOINC, code, display, short),
            "subject": _ref(self.patient),
            "effectiveDateTime": _timestamp(moment),
            "performer": [_ref(self.author)],
        }
        rng = self.rng
        if code == BP_PANEL[0]:
            if CONDITIONS["hypertension"] in self.conditions:
                systolic, diastolic = rng.randint(134, 162), rng.randint(84, 99)
            else:
                systolic, diastolic = rng.randint(104, 129), rng.randint(64, 83)
            resource["component"] = [
                {"code": _concept(LOINC, *SYSTOLIC), "valueQuantity": _quantity(systolic, unit)},
                {"code": _concept(LOINC, *DIASTOLIC), "valueQuantity": _quantity(diastolic, unit)},
            ]
            return _Group(moment, [resource])
        value: float
        if code == "8867-4":
            value = rng.randint(58, 92)
        elif code == "9279-1":
            value = rng.randint(12, 18)
        elif code == "8310-5":
            value = round(rng.uniform(36.3, 37.3), 1)
        elif code == "59408-5":
            value = (
                rng.randint(93, 98)
                if CONDITIONS["asthma"] in self.conditions
                else rng.randint(95, 100)
            )
        elif code == "29463-7":
            value = round(visit.weight, 1)
        elif code == "8302-2":
            value = round(self.height, 1)
        else:
            value = round(visit.weight / (self.height / 100) ** 2, 1)
        resource["valueQuantity"] = _quantity(value, unit)
        return _Group(moment, [resource])

    def lab_result(self, lab: Lab, collected: datetime, issued: datetime) -> Resource:
        low, high = reference_range(lab, self.sex)
        value = _lab_value(self.rng, lab, low, high, self.lab_shifts.get(lab.code))
        return _lab_observation(
            self.new_id("Observation"),
            lab,
            value,
            self.sex,
            self.patient,
            self.author,
            collected,
            issued,
        )

    def single_lab(self) -> _Group:
        codes = ("2345-7", "4548-4", "2160-0", "718-7", "2823-3", "18262-6", "3016-3")
        weights = [4.0 if code in self.lab_shifts else 1.0 for code in codes]
        lab = LABS[self.rng.choices(codes, weights=weights)[0]]
        collected = self.past_moment()
        issued = collected + timedelta(
            hours=self.rng.randint(2, 20), minutes=self.rng.randint(0, 59)
        )
        return _Group(collected, [self.lab_result(lab, collected, issued)])

    def panel_size(self) -> int:
        return len(PANELS[self.panel_order[self.panels_taken % len(PANELS)]].members) + 1

    def panel(self) -> _Group:
        panel = PANELS[self.panel_order[self.panels_taken % len(PANELS)]]
        self.panels_taken += 1
        collected = self.past_moment()
        issued = collected + timedelta(
            hours=self.rng.randint(2, 20), minutes=self.rng.randint(0, 59)
        )
        results = [self.lab_result(LABS[code], collected, issued) for code in panel.members]
        abnormal = []
        for obs in results:
            flag = obs["interpretation"][0]["coding"][0]["code"]
            if flag != "N":
                quantity = obs["valueQuantity"]
                word = _INTERPRETATION_DISPLAY[flag].lower()
                abnormal.append(
                    f"{obs['code']['text']} {word} at {quantity['value']} {quantity['unit']}"
                )
        if abnormal:
            conclusion = "; ".join(abnormal) + ". Remaining results within reference intervals."
        else:
            conclusion = "All results within reference intervals."
        report = {
            "resourceType": "DiagnosticReport",
            "id": self.new_id("DiagnosticReport"),
            "status": "final",
            "category": _category("v2-0074", "LAB", "Laboratory"),
            "code": _concept(LOINC, panel.code, panel.display),
            "subject": _ref(self.patient),
            "effectiveDateTime": _timestamp(collected),
            "issued": _timestamp(issued),
            "performer": [_ref(self.author)],
            "result": [
                {"reference": f"Observation/{obs['id']}", "display": obs["code"]["text"]}
                for obs in results
            ],
            "conclusion": conclusion[0].upper() + conclusion[1:],
        }
        return _Group(collected, [*results, report])

    # The mixer's view.

    def next_size(self, kind: str) -> int | None:
        """How many resources the next entry of this kind holds; None when none are left."""
        if kind in self.pending:
            return 1 if self.pending[kind] else None
        return self.panel_size() if kind == "panel" else 1

    def take(self, kind: str) -> _Group:
        if kind in self.pending:
            return self.pending[kind].pop(0)
        if kind == "encounter":
            return self.encounter()
        if kind == "vital":
            return self.vital_sign()
        if kind == "lab":
            return self.single_lab()
        return self.panel()


# Relative frequency of each kind of entry once every kind has appeared once.
KIND_WEIGHTS: dict[str, float] = {
    "vital": 5.0,
    "lab": 3.0,
    "panel": 1.5,
    "medication": 1.5,
    "condition": 1.0,
    "encounter": 1.0,
    "immunization": 1.0,
    "allergy": 0.5,
    "procedure": 0.5,
}


def generate_patient_record_set(
    seed: int, patient_ref: str, author_ref: str, *, when: str | datetime, count: int = 8
) -> list[Resource]:
    """Exactly `count` FHIR R4 resources from one synthetic patient's chart, oldest first.

    Dates fall in the year before `when` (an ISO 8601 string or datetime; naive means UTC).
    Every entry of each kind appears once (in a seeded order, as room allows) before kinds repeat
    by weight, so even small sets are varied. A DiagnosticReport is emitted only together with
    all the Observations it references (as `Observation/<id>`), and only if they all fit.
    Same arguments, same output.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    chart = _Chart(seed, patient_ref, author_ref, _parse_when(when))
    rng = chart.rng
    groups: list[_Group] = []
    room = count
    first_round = list(KIND_WEIGHTS)
    rng.shuffle(first_round)
    for kind in first_round:
        size = chart.next_size(kind)
        if size is not None and size <= room:
            groups.append(chart.take(kind))
            room -= size
    while room > 0:
        kinds = [
            k for k in KIND_WEIGHTS if (size := chart.next_size(k)) is not None and size <= room
        ]
        kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
        group = chart.take(kind)
        groups.append(group)
        room -= len(group.resources)
    groups.sort(key=lambda group: group.moment)
    return [resource for group in groups for resource in group.resources]


def generate_patient(seed: int, *, org: str = "st-mary") -> Resource:
    """A synthetic Patient (name, gender, birth date, contact, and a medical record number under
    `urn:medledger:mrn:<org>`). Demographics identify a person: this stays client side and is
    never written to the chain."""
    rng = random.Random(seed)
    gender = rng.choice(("female", "male"))
    given = rng.sample(GIVEN_NAMES[gender], 2)
    family = rng.choice(FAMILY_NAMES)
    born = date(1938, 1, 1) + timedelta(
        days=rng.randint(0, (date(2005, 12, 31) - date(1938, 1, 1)).days)
    )
    city, state, zip_prefix = rng.choice(CITIES)
    names: list[str] = [given[0]] if rng.random() < 0.6 else given
    return {
        "resourceType": "Patient",
        "id": str(uuid.uuid5(_NAMESPACE, f"patient|{seed}")),
        "identifier": [
            {
                "use": "usual",
                "type": _concept(f"{TERMINOLOGY}/v2-0203", "MR", "Medical record number"),
                "system": f"urn:medledger:mrn:{org}",
                "value": f"{rng.randint(0, 99_999_999):08d}",
            }
        ],
        "active": True,
        "name": [{"use": "official", "family": family, "given": names}],
        "telecom": [
            {
                "system": "phone",
                "value": f"({rng.randint(201, 989)}) 555-01{rng.randint(0, 99):02d}",
                "use": rng.choice(("home", "mobile")),
            }
        ],
        "gender": gender,
        "birthDate": born.isoformat(),
        "address": [
            {
                "use": "home",
                "line": [f"{rng.randint(1, 980)} {rng.choice(STREETS)}"],
                "city": city,
                "state": state,
                "postalCode": f"{zip_prefix}{rng.randint(0, 999):03d}",
                "country": "US",
            }
        ],
        "communication": [
            {
                "language": _concept("urn:ietf:bcp:47", "en-US", "English (United States)"),
                "preferred": True,
            }
        ],
    }


def _note_sentence(rng: random.Random, template: str) -> str:
    return template.format(
        time=f"{rng.randint(7, 10):02d}:{5 * rng.randint(0, 11):02d}",
        minutes=rng.randint(20, 75),
        hours=rng.randint(8, 14),
        small=rng.randint(15, 45),
        levels=rng.choice(("both", "all three")),
        pct=round(rng.uniform(0.3, 2.8), 1),
        days=rng.choice((3, 5, 7)),
    )


def sized_observation(
    seed: int,
    target_bytes: int = 2048,
    *,
    patient_ref: str | None = None,
    author_ref: str | None = None,
    when: str | datetime = "2025-01-01T00:00:00+00:00",
) -> Resource:
    """A valid laboratory Observation whose canonical JSON (`canonical_json`) is at most
    `target_bytes` long and short of it by less than one comment sentence (about 100 bytes): it
    is padded with whole sentences of a laboratory comment in `note`. A target below the size of
    the observation without a comment gets the observation without one."""
    rng = random.Random(seed)
    lab = LABS[rng.choice(sorted(LABS))]
    sex = rng.choice(("female", "male"))
    patient = patient_ref or f"Patient/{uuid.uuid5(_NAMESPACE, f'patient|{seed}')}"
    author = author_ref or f"Practitioner/{uuid.uuid5(_NAMESPACE, f'practitioner|{seed}')}"
    base = _parse_when(when)
    collected = base - timedelta(days=rng.randint(2, 365), hours=rng.randint(0, 12))
    issued = collected + timedelta(hours=rng.randint(2, 20))
    low, high = reference_range(lab, sex)
    value = _lab_value(rng, lab, low, high, None)
    obs_id = str(uuid.uuid5(_NAMESPACE, f"sized|{seed}|{target_bytes}"))
    observation = _lab_observation(obs_id, lab, value, sex, patient, author, collected, issued)
    if len(canonical_json(observation)) >= target_bytes:
        return observation
    note = {"authorReference": _ref(author), "time": _timestamp(issued), "text": "."}
    observation["note"] = [note]
    budget = target_bytes - (len(canonical_json(observation)) - 1)
    # Whole sentences in table order, pass after pass, skipping any that would overshoot.
    sentences: list[str] = []
    used = 0
    added = True
    while added:
        added = False
        for template in LAB_NOTE_SENTENCES:
            sentence = _note_sentence(rng, template)
            cost = len(sentence) + (1 if sentences else 0)
            if used + cost <= budget:
                sentences.append(sentence)
                used += cost
                added = True
    if sentences:
        note["text"] = " ".join(sentences)
    else:
        del observation["note"]
    return observation
