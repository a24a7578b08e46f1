"""Phrasing data for simulated radiology reports: words, sentence templates and what each sentence asserts.

Written for radalign after reading the style of real chest radiograph reports (Indiana University collection);
no report text is copied. To extend the phrasing, add strings here; ``report.py`` holds no wording.

Rules every template keeps, because the labels are derived from which template was used (tests check them):
- A template for a present finding ("definite") never contains a hedge (possible, questionable, may, cannot,
  borderline, concerning, equivocal...) nor a negation (no, not, without, negative).
- A template for an uncertain finding always contains one of the hedges in ``UNCERTAINTY_CUES``.
- A laterality word in a template comes from {side}, {where} or {lobe}, never written out, so it always
  matches the finding's side.
- Placeholders: {where} "in the right lower lobe", {lobe} "right lower lobe", {side} "left" / "right",
  {size} "1.4 cm" / "14 mm", {sev} a severity adjective, {adv} a severity adverb, {tip} "4.5 cm";
  {csev} / {esev} the cardiomegaly / edema severity in the combined heart-failure sentence. A template is only
  used when all its placeholders have a value, so every list keeps templates without {sev} and {size} for
  findings that have none.
- "a" before a vowel sound ("a 8 mm", "a upper") becomes "an" after filling, and the first letter is
  capitalised, so templates may start with a placeholder.
"""

from __future__ import annotations

# Tables are laid out by hand for reading; the formatter would put every string on its own line.
# fmt: off

UNCERTAINTY_CUES = (
    "possible", "possibly", "questionable", "may represent", "may reflect", "may be", "cannot be excluded",
    "cannot exclude", "borderline", "concerning for", "equivocal",
)

# -- location and severity words ---------------------------------------------------------------------------------
LOBE_WHERE: dict[str, tuple[str, ...]] = {
    "right_upper": ("in the right upper lobe", "in the right upper lung", "in the right upper lung zone"),
    "right_middle": ("in the right middle lobe", "in the right mid lung", "in the right mid lung zone"),
    "right_lower": ("in the right lower lobe", "at the right lung base", "in the right lower lung zone"),
    "left_upper": ("in the left upper lobe", "in the left upper lung", "in the left upper lung zone"),
    "left_lower": ("in the left lower lobe", "at the left lung base", "in the left lower lung zone"),
}
LOBE_ATTRIBUTIVE: dict[str, tuple[str, ...]] = {
    "right_upper": ("right upper lobe", "right upper lung"),
    "right_middle": ("right middle lobe", "right mid lung"),
    "right_lower": ("right lower lobe", "right basilar", "right base"),
    "left_upper": ("left upper lobe", "left upper lung"),
    "left_lower": ("left lower lobe", "left basilar", "left base"),
}
SEVERITY_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "pleural_effusion": {"small": ("small",), "moderate": ("moderate", "moderate-sized"), "large": ("large",)},
    "pneumothorax": {"small": ("small", "tiny"), "moderate": ("moderate", "moderate-sized"), "large": ("large",)},
    "cardiomegaly": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("marked", "severe")},
    "edema": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "marked")},
    "consolidation": {"mild": ("patchy", "mild"), "moderate": ("moderate", "confluent"),
                      "severe": ("extensive", "dense")},
}
SEVERITY_ADVERBS: dict[str, tuple[str, ...]] = {
    "mild": ("mildly",), "moderate": ("moderately",), "severe": ("markedly", "severely"),
}

# -- FINDINGS section: one sentence per finding, by kind (or device) and certainty -------------------------------
# "<key>/<severity>" entries are added to the key's own when the finding's severity matches.
FINDING_SENTENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "nodule": {
        "definite": (
            "There is a {size} nodule {where}.", "A {size} nodule is seen {where}.",
            "A {size} nodular opacity {where}.", "{lobe} nodule measuring {size}.",
            "A rounded {size} nodule is present {where}.",
            "There is a well-circumscribed {size} pulmonary nodule {where}.",
            "Nodular density {where}, measuring approximately {size}.", "A {size} {lobe} pulmonary nodule is noted.",
            "There is a nodule {where}.",
        ),
        "uncertain": (
            "Possible {size} nodule {where}.", "Questionable {size} nodular opacity {where}.",
            "A faint {size} opacity {where} may represent a pulmonary nodule.",
            "Vague {size} nodular density {where}; a pulmonary nodule cannot be excluded.", "Possible nodule {where}.",
        ),
    },
    "nodule_additional": {
        "definite": (
            "A second {size} nodule is seen {where}.", "An additional {size} nodule is present {where}.",
            "There is another {size} nodule {where}.", "A second nodule {where} measures {size}.",
            "Another nodule is seen {where}.",
        ),
        "uncertain": (
            "An additional {size} opacity {where} may represent a second nodule.",
            "Possible second {size} nodule {where}.", "Possible second nodule {where}.",
        ),
    },
    "mass": {
        "definite": (
            "There is a {size} mass {where}.", "A {size} mass is present {where}.", "{lobe} mass measuring {size}.",
            "A lobulated {size} mass is seen {where}.", "There is a {size} soft tissue mass {where}.",
            "Large {lobe} mass, measuring approximately {size}.", "There is a mass {where}.",
        ),
        "uncertain": (
            "A rounded opacity {where} may represent a mass.", "Possible {size} mass {where}.",
            "Ill-defined {size} opacity {where}; an underlying mass cannot be excluded.", "Questionable {lobe} mass.",
        ),
    },
    "consolidation": {
        "definite": (
            "{sev} consolidation {where}.", "There is {sev} airspace consolidation {where}.",
            "{sev} airspace consolidation is present {where}.", "{sev} consolidative opacity {where}.",
            "There is {sev} consolidation of the {lobe}.", "Focal consolidation {where}.",
            "{lobe} airspace consolidation.",
        ),
        "uncertain": (
            "Possible {sev} consolidation {where}.", "Hazy opacity {where}, which may represent early consolidation.",
            "Questionable airspace consolidation {where}.", "Subtle opacity {where}; consolidation cannot be excluded.",
        ),
    },
    "atelectasis": {
        "definite": (
            "{lobe} atelectasis.", "Plate-like atelectasis {where}.", "Linear atelectasis {where}.",
            "There is subsegmental atelectasis {where}.", "Discoid atelectasis {where}.",
            "Minimal {lobe} atelectasis.", "Streaky {lobe} atelectasis.",
        ),
        "uncertain": (
            "Linear opacity {where}, possibly atelectasis.", "Streaky opacity {where} may represent atelectasis.",
            "Questionable {lobe} atelectasis.", "Linear opacity {where}, which may reflect atelectasis or scarring.",
        ),
    },
    "pleural_effusion": {
        "definite": (
            "There is a {sev} {side} pleural effusion.", "{sev} {side} pleural effusion.",
            "{sev} {side}-sided pleural effusion.", "{sev} {side} effusion is present.",
            "{sev} amount of {side} pleural fluid.", "Layering {side} pleural effusion, {sev} in size.",
            "{side} pleural effusion.",
        ),
        "uncertain": (
            "Possible {sev} {side} pleural effusion.", "Questionable {sev} {side} pleural effusion.",
            "Slight blunting of the {side} costophrenic angle may represent a {sev} effusion.",
            "A {sev} {side} pleural effusion cannot be excluded.", "Possible {side} pleural effusion.",
        ),
    },
    "pleural_effusion/small": {
        "definite": ("Blunting of the {side} costophrenic angle, consistent with a small pleural effusion.",),
    },
    "pleural_effusion/large": {
        "definite": ("{sev} {side} pleural effusion obscuring the {side} hemidiaphragm.",),
    },
    "pleural_effusion_bilateral": {
        "definite": (
            "{sev} bilateral pleural effusions.", "There are {sev} bilateral pleural effusions.",
            "{sev} pleural effusions bilaterally.", "{sev} bilateral effusions are present.",
            "Bilateral pleural effusions.",
        ),
        "uncertain": (
            "Possible {sev} bilateral pleural effusions.",
            "Blunting of both costophrenic angles may represent {sev} effusions.",
            "Questionable {sev} bilateral effusions.", "Possible bilateral pleural effusions.",
        ),
    },
    "pleural_effusion_bilateral/small": {
        "definite": ("Blunting of both costophrenic angles, consistent with small bilateral effusions.",),
    },
    "pneumothorax": {
        "definite": (
            "There is a {sev} {side} apical pneumothorax.", "{sev} {side} pneumothorax.",
            "{sev} {side}-sided pneumothorax is present.", "A {sev} {side} apical pneumothorax is seen.",
            "A visceral pleural line is seen at the {side} apex, consistent with a {sev} pneumothorax.",
            "{side} apical pneumothorax.",
        ),
        "uncertain": (
            "Questionable {sev} {side} apical pneumothorax.", "Possible {sev} {side} apical pneumothorax.",
            "Subtle lucency at the {side} apex may represent a {sev} pneumothorax.",
            "A {sev} {side} apical pneumothorax cannot be excluded.", "Questionable {side} apical pneumothorax.",
        ),
    },
    "cardiomegaly": {
        "definite": (
            "{sev} cardiomegaly.", "There is {sev} cardiomegaly.", "The heart is {adv} enlarged.",
            "The cardiac silhouette is {adv} enlarged.", "{sev} enlargement of the cardiac silhouette.",
            "Heart size is {adv} enlarged.", "Cardiomegaly.", "The heart is enlarged.",
        ),
        "uncertain": (
            "Heart size is borderline.", "Borderline cardiomegaly.", "The heart may be mildly enlarged.",
            "Borderline enlargement of the cardiac silhouette.", "Questionable mild cardiomegaly.",
        ),
    },
    "edema": {
        "definite": (
            "{sev} pulmonary edema.", "There is {sev} pulmonary edema.", "{sev} interstitial pulmonary edema.",
            "Bilateral perihilar opacities consistent with {sev} pulmonary edema.",
            "{sev} perihilar haziness and vascular indistinctness, consistent with pulmonary edema.",
            "Pulmonary vascular congestion with {sev} interstitial edema.", "Interstitial pulmonary edema.",
        ),
        "uncertain": (
            "Possible {sev} interstitial edema.", "Perihilar haziness, which may represent {sev} pulmonary edema.",
            "Questionable {sev} perihilar edema.", "Equivocal {sev} interstitial edema.",
            "Possible interstitial edema.",
        ),
    },
    "edema/severe": {
        "definite": ("Diffuse bilateral perihilar airspace opacities, consistent with severe alveolar edema.",),
    },
    "endotracheal tube": {
        "definite": (
            "Endotracheal tube terminates {tip} above the carina.",
            "The endotracheal tube tip is {tip} above the carina.",
            "ET tube in satisfactory position, {tip} above the carina.",
            "Endotracheal tube with tip approximately {tip} above the carina.",
            "An endotracheal tube is in place, terminating {tip} above the carina.",
            "Endotracheal tube in standard position.",
        ),
    },
    "central venous catheter": {
        "definite": (
            "{side} subclavian central venous catheter with tip in the lower superior vena cava.",
            "{side} subclavian central line terminates in the distal SVC.",
            "A {side}-sided central venous catheter tip projects over the cavoatrial junction.",
            "{side}-sided central venous catheter terminates in the lower superior vena cava.",
            "There is a {side} subclavian catheter with its tip in the distal SVC.",
        ),
    },
    "nasogastric tube": {
        "definite": (
            "Nasogastric tube courses below the diaphragm, with the tip in the stomach.",
            "The nasogastric tube tip is in the stomach.", "Enteric tube tip projects over the stomach.",
            "Nasogastric tube in place, terminating in the stomach.",
            "An enteric tube passes below the diaphragm into the stomach.",
        ),
    },
}

# Pneumonia is an interpretation of a consolidation: "definite" -> pneumonia 1, "hedged" -> pneumonia -1.
PNEUMONIA_SUFFIX: dict[str, tuple[str, ...]] = {
    "definite": (", consistent with pneumonia", ", compatible with pneumonia", ", in keeping with pneumonia"),
    "hedged": (", concerning for pneumonia", ", which may represent pneumonia", ", possibly pneumonia"),
}

# -- IMPRESSION: short restatements, most important first -------------------------------------------------------
IMPRESSION_SENTENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "nodule": {
        "definite": ("A {size} {lobe} nodule.", "{lobe} nodule measuring {size}.", "Pulmonary nodule {where}, {size}.",
                     "{lobe} pulmonary nodule."),
        "uncertain": ("Possible {size} {lobe} nodule.", "Questionable {lobe} nodule."),
    },
    "nodule_additional": {
        "definite": ("Second {size} nodule {where}.", "Additional {size} {lobe} nodule.", "Additional {lobe} nodule."),
        "uncertain": ("Possible second nodule {where}.",),
    },
    "mass": {
        "definite": ("A {size} {lobe} mass.", "{lobe} mass measuring {size}.", "{lobe} mass."),
        "uncertain": ("Possible {lobe} mass.", "{lobe} opacity; an underlying mass cannot be excluded."),
    },
    "consolidation": {
        "definite": ("{sev} {lobe} consolidation.", "{sev} airspace consolidation {where}.", "{lobe} consolidation."),
        "uncertain": ("Possible {lobe} consolidation.", "Questionable airspace consolidation {where}."),
    },
    "pneumonia": {  # a consolidation reported as pneumonia (definite) or as possible pneumonia (hedged)
        "definite": ("{lobe} pneumonia.",),
        "hedged": ("Possible early pneumonia {where}.", "Questionable {lobe} pneumonia.",
                   "Subtle {lobe} opacity, which may represent early pneumonia."),
    },
    "atelectasis": {
        "definite": ("{lobe} atelectasis.", "{lobe} subsegmental atelectasis.", "Mild atelectasis {where}."),
        "uncertain": ("Possible {lobe} atelectasis.",),
    },
    "pleural_effusion": {
        "definite": ("{sev} {side} pleural effusion.", "{sev} {side} effusion.", "{side} pleural effusion."),
        "uncertain": ("Possible {sev} {side} pleural effusion.", "Questionable {sev} {side} effusion.",
                      "Possible {side} pleural effusion."),
    },
    "pleural_effusion_bilateral": {
        "definite": ("{sev} bilateral pleural effusions.", "{sev} bilateral effusions.",
                     "Bilateral pleural effusions."),
        "uncertain": ("Possible {sev} bilateral pleural effusions.", "Possible bilateral pleural effusions."),
    },
    "pneumothorax": {
        "definite": ("{sev} {side} pneumothorax.", "{sev} {side} apical pneumothorax.", "{side} pneumothorax."),
        "uncertain": ("Questionable {sev} {side} pneumothorax; consider an expiratory view.",
                      "Possible {sev} {side} apical pneumothorax.", "Possible {side} apical pneumothorax."),
    },
    "cardiomegaly": {
        "definite": ("{sev} cardiomegaly.", "Cardiomegaly.", "{adv} enlarged cardiac silhouette."),
        "uncertain": ("Borderline cardiomegaly.", "Borderline heart size."),
    },
    "edema": {
        "definite": ("{sev} pulmonary edema.", "{sev} interstitial edema.", "Pulmonary edema."),
        "uncertain": ("Possible {sev} pulmonary edema.", "Questionable {sev} interstitial edema.",
                      "Possible pulmonary edema."),
    },
    "endotracheal tube": {
        "definite": ("Endotracheal tube in satisfactory position.", "ET tube terminates {tip} above the carina.",
                     "Endotracheal tube tip {tip} above the carina."),
    },
    "central venous catheter": {
        "definite": ("{side} subclavian central venous catheter in satisfactory position.",
                     "{side}-sided central line with tip in the SVC."),
    },
    "nasogastric tube": {
        "definite": ("Nasogastric tube terminates in the stomach.", "Enteric tube in satisfactory position."),
    },
}
CHF_IMPRESSIONS = (  # cardiomegaly and edema, both definite, in one sentence
    "{csev} cardiomegaly and {esev} pulmonary edema, consistent with congestive heart failure.",
    "{csev} cardiomegaly with {esev} interstitial edema.",
    "Findings of congestive heart failure with {csev} cardiomegaly and {esev} pulmonary edema.",
    "Cardiomegaly and pulmonary edema, consistent with congestive heart failure.",
)
DEVICES_SUMMARY = ("Support devices as described above.", "Lines and tubes as above.")  # any device(s)
NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.", "No acute cardiopulmonary disease.",
    "No acute intrathoracic process.", "No active cardiopulmonary disease.", "No acute cardiopulmonary findings.",
    "No radiographic evidence of acute cardiopulmonary disease.",
)
NORMAL_IMPRESSIONS_NO_DEVICE = ("Normal chest radiograph.", "Normal chest.")
RECOMMENDATIONS = {  # appended after an impression item; they assert nothing
    "lesion": ("Recommend chest CT for further evaluation.", "Chest CT is recommended for further characterization.",
               "Consider CT of the chest for further evaluation."),
    "pneumonia": ("Recommend follow-up radiographs after treatment to document resolution.",),
    "pneumothorax": ("Findings were discussed with the referring clinician at the time of interpretation.",),
}

# -- normal anatomy: (sentence, label keys it denies); a group is used only when its kinds are absent -------------
PARENCHYMA = ("consolidation", "edema", "atelectasis", "nodule", "mass")
PLEURA = ("pleural_effusion", "pneumothorax")
_HEART = ("cardiomegaly", "enlarged_cardiomediastinum")
NORMAL_SENTENCES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "lungs_clear": (
        ("The lungs are clear.", ("lung_opacity",)), ("Lungs are clear.", ("lung_opacity",)),
        ("The lungs are clear bilaterally.", ("lung_opacity",)), ("Clear lungs.", ("lung_opacity",)),
        ("Both lungs are clear and well expanded.", ("lung_opacity",)),
        ("The lungs are well expanded and clear.", ("lung_opacity",)),
        ("The lungs are free of focal airspace disease.", ("lung_opacity",)),
    ),
    "lungs_otherwise": (("The lungs are otherwise clear.", ()), ("Otherwise, the lungs are clear.", ())),
    "heart": (
        ("Heart size is normal.", ("cardiomegaly",)), ("The heart is normal in size.", ("cardiomegaly",)),
        ("Normal heart size.", ("cardiomegaly",)), ("Heart size is within normal limits.", ("cardiomegaly",)),
        ("The cardiac silhouette is normal in size.", ("cardiomegaly",)),
    ),
    "cardiomediastinal": (
        ("The cardiomediastinal silhouette is within normal limits.", _HEART),
        ("Normal cardiomediastinal silhouette.", _HEART), ("The heart and mediastinum are normal.", _HEART),
        ("Heart size and mediastinal contours are normal.", _HEART),
    ),
    "mediastinum": (
        ("The mediastinal contours are unremarkable.", ("enlarged_cardiomediastinum",)),
        ("Mediastinal contours are within normal limits.", ("enlarged_cardiomediastinum",)),
        ("The mediastinum is unremarkable.", ("enlarged_cardiomediastinum",)),
        ("Normal mediastinal contours.", ("enlarged_cardiomediastinum",)),
    ),
    "trachea": (("The trachea is midline.", ()),),
    "vascularity": (("Pulmonary vascularity is within normal limits.", ()), ("Normal pulmonary vascularity.", ())),
    "bones": (
        ("No acute osseous abnormality.", ()), ("Visualized osseous structures are unremarkable.", ()),
        ("The osseous structures are intact.", ()), ("No acute bony abnormality.", ()),
        ("No displaced rib fracture.", ("fracture",)), ("No acute fracture.", ("fracture",)),
        ("Degenerative changes of the thoracic spine.", ()), ("Mild degenerative changes of the thoracic spine.", ()),
        ("No free air under the diaphragm.", ()),
    ),
}
NORMAL_REQUIRES_ABSENT: dict[str, tuple[str, ...]] = {
    "lungs_clear": PARENCHYMA + PLEURA,
    "heart": ("cardiomegaly",),
    "cardiomediastinal": ("cardiomegaly",),
    "mediastinum": ("cardiomegaly",),  # CheXpert hierarchy: cardiomegaly implies an enlarged cardiomediastinum
    "vascularity": ("edema",),
}

# -- explicit negations: unit -> (noun phrases, kinds that must be absent, label keys denied, rate factor) -------
# The rate factor scales ``negation_rate``: reports deny pneumothorax and effusion far more often than
# atelectasis. SOLO units are never listed with others ("no nodule or mass or effusion" reads badly).
NEGATION_UNITS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], float]] = {
    "pneumothorax": (("pneumothorax",), ("pneumothorax",), ("pneumothorax",), 1.0),
    "pleural_effusion": (("pleural effusion", "effusion", "pleural fluid"), ("pleural_effusion",),
                         ("pleural_effusion",), 1.0),
    "consolidation": (("focal consolidation", "focal airspace consolidation", "consolidation"), ("consolidation",),
                      ("consolidation",), 0.8),
    "edema": (("pulmonary edema", "edema", "pulmonary vascular congestion"), ("edema",), ("edema",), 0.4),
    "pneumonia": (("pneumonia",), ("consolidation",), ("pneumonia",), 0.15),
    "cardiomegaly": (("cardiomegaly",), ("cardiomegaly",), ("cardiomegaly",), 0.15),
    "atelectasis": (("atelectasis",), ("atelectasis",), ("atelectasis",), 0.08),
    "lung_lesion": (("suspicious pulmonary nodule or mass", "pulmonary nodule or mass", "suspicious nodule or mass"),
                    ("nodule", "mass"), ("nodule", "mass", "lung_lesion"), 0.15),
}
SOLO_NEGATIONS = ("lung_lesion",)
NEGATION_FRAMES: dict[int, tuple[str, ...]] = {
    1: ("No {0}.", "There is no {0}.", "No evidence of {0}.", "No {0} is seen.", "No {0} is identified.",
        "Negative for {0}.", "There is no evidence of {0}.", "No {0} is present."),
    2: ("No {0} or {1}.", "There is no {0} or {1}.", "No {0} or {1} is seen.", "No evidence of {0} or {1}.",
        "Negative for {0} or {1}.", "No {0} or {1} is identified."),
    3: ("No {0}, {1}, or {2}.", "No {0}, {1} or {2}.", "There is no {0}, {1}, or {2}.",
        "No evidence of {0}, {1}, or {2}.", "Negative for {0}, {1}, or {2}.", "No {0}, {1}, or {2} is identified."),
}
LUNGS_CLEAR_WITH_NEGATIONS = (  # {list}: "a", "a or b", "a, b, or c"; also denies lung_opacity
    "The lungs are clear without {list}.", "Lungs are clear, with no {list}.", "The lungs are clear of {list}.",
    "Both lungs are clear, without {list}.",
)

# Orders of the FINDINGS blocks, as radiologists vary them.
BLOCK_ORDERS = (
    ("devices", "heart", "chest", "bones"), ("devices", "chest", "heart", "bones"),
    ("chest", "heart", "bones", "devices"), ("heart", "chest", "devices", "bones"),
)

# fmt: on
