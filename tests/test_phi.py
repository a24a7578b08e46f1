"""Patient data never leaves the inputs (issue 14): values planted in the DICOM PS3.15 basic-profile attributes and
in report text run through data check -> prepare -> pretrain -> evaluate -> export, and no written file, log line
or console output holds any of them."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.datadict import dictionary_VR

# Attributes of PS3.15 Table E.1-1 (the Basic Application Level Confidentiality Profile) with text, date or time
# values, the ones a planted marker can travel in; sequences and binary values are left out.
BASIC_PROFILE = """
AccessionNumber AcquisitionComments AcquisitionDate AcquisitionDateTime AcquisitionDeviceProcessingDescription
AcquisitionTime ActualHumanPerformersSequence AdditionalPatientHistory AdmissionID AdmittingDate
AdmittingDiagnosesDescription AdmittingTime Allergies Arbitrary AuthorObserverSequence BranchOfService
CommentsOnThePerformedProcedureStep ConfidentialityConstraintOnPatientDataDescription ContentCreatorName
ContentDate ContentTime ContrastBolusAgent CountryOfResidence CurrentPatientLocation CurveDate CurveTime
DerivationDescription DetectorID DeviceSerialNumber DischargeDiagnosisDescription EthnicGroup
FillerOrderNumberImagingServiceRequest FrameComments GantryID GeneratorID IdentifyingComments ImageComments
ImagePresentationComments ImagingServiceRequestComments Impressions InstitutionAddress InstitutionName
InstitutionalDepartmentName InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription
InterpretationIDIssuer InterpretationRecorder InterpretationText InterpretationTranscriber IssuerOfAdmissionID
IssuerOfPatientID MedicalAlerts MedicalRecordLocator MilitaryRank ModifiedImageDescription NameOfPhysiciansReadingStudy
NamesOfIntendedRecipientsOfResults Occupation OperatorsName OrderCallbackPhoneNumber OrderEnteredBy
OrderEntererLocation OtherPatientIDs OtherPatientNames OverlayDate OverlayTime
ParticipantSequence PatientAddress PatientAge PatientBirthDate PatientBirthName PatientBirthTime PatientComments
PatientID PatientInstitutionResidence PatientMotherBirthName PatientName PatientReligiousPreference
PatientSexNeutered PatientState PatientTelephoneNumbers PerformedLocation PerformedProcedureStepDescription
PerformedProcedureStepID PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationName PerformingPhysicianName PersonAddress PersonName PersonTelephoneNumbers
PhysiciansOfRecord PhysiciansReadingStudyIdentificationSequence PlacerOrderNumberImagingServiceRequest
PreMedication ProtocolName ReasonForStudy ReferringPhysicianAddress ReferringPhysicianName
ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence RequestedProcedureDescription
RequestedProcedureID RequestedProcedureLocation RequestingPhysician RequestingService ResponsibleOrganization
ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer ScheduledPerformingPhysicianName
ScheduledProcedureStepDescription ScheduledProcedureStepEndDate ScheduledProcedureStepLocation
ScheduledProcedureStepStartDate ScheduledStationAETitle ScheduledStationName ScheduledStudyLocation
SeriesDate SeriesDescription SeriesTime ServiceEpisodeDescription ServiceEpisodeID SmokingStatus
SpecialNeeds StationName StudyComments StudyDate StudyDescription StudyID StudyIDIssuer StudyTime
TextComments TextString TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle VerifyingObserverName
VisitComments
""".split()  # noqa: SIM905 - a readable block of DICOM keywords
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}
REPORT_SECRETS = ("Zebulonvandermeer", "MRN-7731904")


def _plant(index: int, vr: str) -> str:
    """A value of the attribute's VR that appears nowhere else: dates in 1877, times 23:59:xx, text 'PHIxxxQ'."""
    return {
        "DA": f"1877{1 + index % 12:02d}{1 + index % 28:02d}",
        "TM": f"2359{index % 60:02d}.7731",
        "DT": f"1877061323{index % 60:02d}",
        "AS": f"{index % 1000:03d}Y",
        "DS": f"7731.{index:03d}",
        "IS": f"7731{index:03d}",
        "PN": f"PHI{index:03d}Q^Person",
    }.get(vr, f"PHI{index:03d}Q")


def _plant_all(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path)
    planted = {}
    for index, keyword in enumerate(BASIC_PROFILE):
        vr = dictionary_VR(keyword)
        if vr not in TEXT_VRS:
            continue
        value = _plant(index, vr)
        setattr(ds, keyword, value)
        planted[keyword] = value
    ds.save_as(path)
    return planted


def _markers(planted: dict[str, str]) -> list[str]:
    """What to grep for: text markers whole, dates and times as written, a person's family name on its own."""
    values = {value.split("^")[0] for value in planted.values() if value not in ("000Y",)}
    return sorted(v for v in values if len(v) >= 6) + list(REPORT_SECRETS)


def test_planted_patient_data_reaches_no_written_file(tmp_path, caplog, capsys):
    from radalign.cli import main
    from radalign.config import find_config, load_config
    from radalign.data.simulate.generate import SimulationConfig, simulate
    from radalign.evaluation.run import evaluate
    from radalign.training.run import pretrain

    data = tmp_path / "data"
    manifest = simulate(SimulationConfig(n=24, size=64, image_format="dicom", workers=1), data, progress=False)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    planted: dict[str, str] = {}
    for image in table["image"]:
        planted = _plant_all(data / image)
    assert len(planted) > 100  # attributes with text, date or time values in this pydicom's dictionary
    secret = f" Patient {REPORT_SECRETS[0]} ({REPORT_SECRETS[1]}) was seen today."
    table["report"] = table["report"] + secret
    table.to_csv(manifest, index=False)

    caplog.set_level(logging.DEBUG)
    written = tmp_path / "written"
    written.mkdir()
    main(["data", "check", str(manifest), "--json_out", str(written / "check.json")])  # no exit: no row is bad
    main(["prepare", "--data", str(manifest), "--out", str(written / "cache"), "--size", "64", "--workers", "1"])
    config = load_config(find_config("clip-tiny"), {
        "loader.manifest": str(manifest), "loader.cache_dir": str(written / "cache"), "loader.image_size": 64,
        "loader.batch_size": 8, "loader.max_length": 64, "model.text.freeze_layers": 6, "trainer.max_steps": 2,
        "trainer.checkpoint_every_n_steps": 1, "trainer.progress": False,
    })  # fmt: skip
    run = pretrain(config, written / "run")
    overrides = {"image_size": 64, "bootstrap": 10, "seeds": [0],
                 "tasks.linear_probe.fractions": [1.0], "tasks.linear_probe.epochs": 2}  # fmt: skip
    evaluate(run.export, "quick", written / "eval", data=manifest, overrides=overrides,
             tasks=["zero_shot", "retrieval", "linear_probe", "grounding"], progress=False)  # fmt: skip

    files = [p for p in written.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".json", ".npy", ".ckpt", ".safetensors", ".csv", ".yaml", ".md", ".png"} <= kinds, kinds
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    console = capsys.readouterr()
    texts = {"console": (console.out + console.err + caplog.text).lower().encode()}
    texts.update({str(p.relative_to(written)): p.read_bytes().lower() for p in files})
    # the search finds what is there: every marker in the inputs (a DICOM's header, the manifest's reports)
    inputs = ((data / table["image"].iloc[0]).read_bytes() + manifest.read_bytes()).lower()
    assert all(marker.lower().encode() in inputs for marker in _markers(planted))
    found = [(marker, where) for marker in _markers(planted) for where, blob in texts.items()
             if marker.lower().encode() in blob]  # fmt: skip
    assert found == [], f"patient data written out: {found[:10]}"
