"""Write fundus images as DICOM: synthetic images, and de-identified images derived from real DICOM.

Three entry points:

* `write_synthetic_dicom(rgb, path, model_name=..., checkpoint_sha256=..., seed=..., grade=..., codes=...)`
  writes a generated image as a **Secondary Capture** object marked synthetic.
* `deidentify(ds)` returns a copy of a real dataset de-identified with the DICOM PS3.15 Annex E
  **Basic Application Level Confidentiality Profile** (table `BASIC_PROFILE`).
* `export_derived_dicom(source, rgb, out_path, derivation_description=...)` writes an image computed
  from a real DICOM file (e.g. the preprocessed fundus) as a de-identified Secondary Capture that
  keeps the (de-identified, consistently re-UIDed) patient/study context of its source.

Every file is written with Explicit VR Little Endian, a conformant file meta group (128-byte
preamble, ``DICM``), 8-bit RGB pixels, and atomically (`retinagen.fileio`): a reader never sees a
half-written file and a failed write leaves nothing behind. Files round-trip through
`retinagen.data.dicom.read_dicom` to the same pixels.

Why Secondary Capture and not Ophthalmic Photography 8 Bit
    The OP 8 Bit IOD requires acquisition facts (Type 1/2 Ophthalmic Photographic Parameters:
    acquisition device type, illumination, light path filters, detector type, pupil dilation,
    horizontal field of view, ...). A generated or post-processed image has none of these, so an
    OP object would have to invent them. Secondary Capture is the IOD for images made by software:
    its SC Equipment module records *Conversion Type* ``SYN`` (synthetic image) or ``WSD``
    (workstation), and `read_dicom` accepts it like OP. Modality is ``OT`` for synthetic images
    (no ophthalmic camera was involved) and the source's modality for derived ones.

What is never written
    No real patient data in synthetic files: Patient's Name and Patient ID are the fixed value
    ``SYNTHETIC`` (not empty, so a PACS neither rejects the files nor merges them with a real
    "unknown" patient, and anyone browsing by patient sees at once what they are); birth date and
    sex are empty. The only dates are the creation date/time of the file itself.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as dcm_uid
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from retinagen import __version__
from retinagen.data.dicom import element_text, silence_pydicom
from retinagen.errors import BadInputError, DicomError
from retinagen.fileio import atomic_write_with

__all__ = [
    "BASIC_PROFILE",
    "DEIDENTIFICATION_CODE",
    "DUMMY_VALUES",
    "SYNTHETIC_PATIENT",
    "WrittenDicom",
    "deidentify",
    "export_derived_dicom",
    "write_synthetic_dicom",
]

#: Patient's Name and Patient ID of every synthetic image (see the module docstring for why).
SYNTHETIC_PATIENT = "SYNTHETIC"

#: (Code Value, Coding Scheme Designator, Code Meaning) recorded in Deidentification Method Code
#: Sequence (0012,0064). Only the Basic Profile itself: no profile option (Clean Pixel Data, Retain
#: Longitudinal ..., Retain Safe Private, ...) is implemented, so none is claimed.
DEIDENTIFICATION_CODE: tuple[str, str, str] = ("113100", "DCM", "Basic Application Confidentiality Profile")

# --- PS3.15 Table E.1-1, Basic Profile column ----------------------------------------------------
#
# Tag -> (keyword, action as printed in the standard, edition 2024b). Actions: X remove; Z empty
# (zero length); D replace with a dummy value; U replace the UID (consistently); combinations such
# as X/Z/D mean "whichever the IOD needs" and `_resolve_action` picks one. The rows are the table's
# entries for patients, studies, series, equipment, requests, procedure steps, structured content,
# specimens, photographs (EXIF/GPS) and RT objects, i.e. everything a fundus image, a secondary
# capture or a pydicom test file can carry; the table's remaining rows (hanging-protocol selector
# values, RT conceptual volumes and prescriptions, waveform annotations ...) are covered by the
# rules below it: every other person name, date and time is emptied and every other instance UID
# replaced. Repeating groups (curves 50xx, overlays 60xx) and private tags are handled by rule.
_E11_ROWS: tuple[tuple[int, str, str], ...] = (
    # patient
    (0x00100010, "PatientName", "Z"),
    (0x00100020, "PatientID", "Z/D"),
    (0x00100021, "IssuerOfPatientID", "X"),
    (0x00100030, "PatientBirthDate", "Z"),
    (0x00100032, "PatientBirthTime", "X"),
    (0x00100040, "PatientSex", "Z"),
    (0x00100050, "PatientInsurancePlanCodeSequence", "X"),
    (0x00100101, "PatientPrimaryLanguageCodeSequence", "X"),
    (0x00100102, "PatientPrimaryLanguageModifierCodeSequence", "X"),
    (0x00101000, "OtherPatientIDs", "X"),
    (0x00101001, "OtherPatientNames", "X"),
    (0x00101002, "OtherPatientIDsSequence", "X"),
    (0x00101005, "PatientBirthName", "X"),
    (0x00101010, "PatientAge", "X"),
    (0x00101020, "PatientSize", "X"),
    (0x00101030, "PatientWeight", "X"),
    (0x00101040, "PatientAddress", "X"),
    (0x00101050, "InsurancePlanIdentification", "X"),
    (0x00101060, "PatientMotherBirthName", "X"),
    (0x00101080, "MilitaryRank", "X"),
    (0x00101081, "BranchOfService", "X"),
    (0x00101090, "MedicalRecordLocator", "X"),
    (0x00101100, "ReferencedPatientPhotoSequence", "X"),
    (0x00102000, "MedicalAlerts", "X"),
    (0x00102110, "Allergies", "X"),
    (0x00102150, "CountryOfResidence", "X"),
    (0x00102152, "RegionOfResidence", "X"),
    (0x00102154, "PatientTelephoneNumbers", "X"),
    (0x00102155, "PatientTelecomInformation", "X"),
    (0x00102160, "EthnicGroup", "X"),
    (0x00102180, "Occupation", "X"),
    (0x001021A0, "SmokingStatus", "X"),
    (0x001021B0, "AdditionalPatientHistory", "X"),
    (0x001021C0, "PregnancyStatus", "X"),
    (0x001021D0, "LastMenstrualDate", "X"),
    (0x001021F0, "PatientReligiousPreference", "X"),
    (0x00102203, "PatientSexNeutered", "X/Z"),
    (0x00102297, "ResponsiblePerson", "X"),
    (0x00102299, "ResponsibleOrganization", "X"),
    (0x00104000, "PatientComments", "X"),
    # clinical trial
    (0x00120010, "ClinicalTrialSponsorName", "D"),
    (0x00120020, "ClinicalTrialProtocolID", "D"),
    (0x00120021, "ClinicalTrialProtocolName", "Z"),
    (0x00120030, "ClinicalTrialSiteID", "Z"),
    (0x00120031, "ClinicalTrialSiteName", "Z"),
    (0x00120040, "ClinicalTrialSubjectID", "D"),
    (0x00120042, "ClinicalTrialSubjectReadingID", "D"),
    (0x00120050, "ClinicalTrialTimePointID", "Z"),
    (0x00120051, "ClinicalTrialTimePointDescription", "X"),
    (0x00120060, "ClinicalTrialCoordinatingCenterName", "Z"),
    (0x00120071, "ClinicalTrialSeriesID", "X"),
    (0x00120072, "ClinicalTrialSeriesDescription", "X"),
    (0x00120081, "ClinicalTrialProtocolEthicsCommitteeName", "D"),
    (0x00120082, "ClinicalTrialProtocolEthicsCommitteeApprovalNumber", "X"),
    # camera (EXIF) attributes of VL photographs: owner, lens serial, maker notes, location
    (0x0016002B, "MakerNote", "X"),
    (0x0016004D, "CameraOwnerName", "X"),
    (0x00160051, "LensSerialNumber", "X"),
    *((0x00160000 | element, keyword_for_tag(0x00160000 | element), "X") for element in range(0x70, 0x8F)),
    # study, series, instance: dates, times, identifiers, descriptions
    (0x00080012, "InstanceCreationDate", "X/D"),
    (0x00080013, "InstanceCreationTime", "X/Z/D"),
    (0x00080014, "InstanceCreatorUID", "U"),
    (0x00080015, "InstanceCoercionDateTime", "X"),
    (0x00080018, "SOPInstanceUID", "U"),
    (0x00080020, "StudyDate", "Z"),
    (0x00080021, "SeriesDate", "X/D"),
    (0x00080022, "AcquisitionDate", "X/Z"),
    (0x00080023, "ContentDate", "Z/D"),
    (0x00080024, "OverlayDate", "X"),
    (0x00080025, "CurveDate", "X"),
    (0x0008002A, "AcquisitionDateTime", "X/Z/D"),
    (0x00080030, "StudyTime", "Z"),
    (0x00080031, "SeriesTime", "X/D"),
    (0x00080032, "AcquisitionTime", "X/Z"),
    (0x00080033, "ContentTime", "Z/D"),
    (0x00080034, "OverlayTime", "X"),
    (0x00080035, "CurveTime", "X"),
    (0x00080050, "AccessionNumber", "Z"),
    (0x00080058, "FailedSOPInstanceUIDList", "U"),
    (0x00080080, "InstitutionName", "X/Z/D"),
    (0x00080081, "InstitutionAddress", "X"),
    (0x00080082, "InstitutionCodeSequence", "X/Z/D"),
    (0x00080090, "ReferringPhysicianName", "Z"),
    (0x00080092, "ReferringPhysicianAddress", "X"),
    (0x00080094, "ReferringPhysicianTelephoneNumbers", "X"),
    (0x00080096, "ReferringPhysicianIdentificationSequence", "X"),
    (0x0008009C, "ConsultingPhysicianName", "Z"),
    (0x0008009D, "ConsultingPhysicianIdentificationSequence", "X"),
    (0x00080201, "TimezoneOffsetFromUTC", "X"),
    (0x00081010, "StationName", "X/Z/D"),
    (0x00081030, "StudyDescription", "X"),
    (0x0008103E, "SeriesDescription", "X"),
    (0x00081040, "InstitutionalDepartmentName", "X"),
    (0x00081048, "PhysiciansOfRecord", "X"),
    (0x00081049, "PhysiciansOfRecordIdentificationSequence", "X"),
    (0x00081050, "PerformingPhysicianName", "X"),
    (0x00081052, "PerformingPhysicianIdentificationSequence", "X"),
    (0x00081060, "NameOfPhysiciansReadingStudy", "X"),
    (0x00081062, "PhysiciansReadingStudyIdentificationSequence", "X"),
    (0x00081070, "OperatorsName", "X/Z/D"),
    (0x00081072, "OperatorIdentificationSequence", "X/D"),
    (0x00081080, "AdmittingDiagnosesDescription", "X"),
    (0x00081084, "AdmittingDiagnosesCodeSequence", "X"),
    (0x00081110, "ReferencedStudySequence", "X/Z"),
    (0x00081111, "ReferencedPerformedProcedureStepSequence", "X/Z/D"),
    (0x00081120, "ReferencedPatientSequence", "X"),
    (0x00081140, "ReferencedImageSequence", "X/Z/U*"),
    (0x00081155, "ReferencedSOPInstanceUID", "U"),
    (0x00081195, "TransactionUID", "U"),
    (0x00082111, "DerivationDescription", "X"),
    (0x00082112, "SourceImageSequence", "X/Z/U*"),
    (0x00083010, "IrradiationEventUID", "U"),
    (0x00084000, "IdentifyingComments", "X"),
    # acquisition, equipment
    (0x00180010, "ContrastBolusAgent", "Z/D"),
    (0x00181000, "DeviceSerialNumber", "X/Z/D"),
    (0x00181002, "DeviceUID", "U"),
    (0x00181004, "PlateID", "X"),
    (0x00181005, "GeneratorID", "X"),
    (0x00181007, "CassetteID", "X"),
    (0x00181008, "GantryID", "X"),
    (0x00181012, "DateOfSecondaryCapture", "X"),
    (0x00181014, "TimeOfSecondaryCapture", "X"),
    (0x00181030, "ProtocolName", "X/D"),
    (0x00181072, "RadiopharmaceuticalStartTime", "X"),
    (0x00181073, "RadiopharmaceuticalStopTime", "X"),
    (0x00181078, "RadiopharmaceuticalStartDateTime", "X"),
    (0x00181079, "RadiopharmaceuticalStopDateTime", "X"),
    (0x00181200, "DateOfLastCalibration", "X"),
    (0x00181201, "TimeOfLastCalibration", "X"),
    (0x00181202, "DateTimeOfLastCalibration", "X"),
    (0x00181400, "AcquisitionDeviceProcessingDescription", "X/D"),
    (0x00184000, "AcquisitionComments", "X"),
    (0x0018700A, "DetectorID", "X/D"),
    (0x00189074, "FrameAcquisitionDateTime", "D"),
    (0x00189151, "FrameReferenceDateTime", "D"),
    (0x00189367, "XRaySourceID", "D"),
    (0x00189371, "XRayDetectorID", "D"),
    (0x00189373, "XRayDetectorLabel", "X"),
    (0x00189424, "AcquisitionProtocolDescription", "X"),
    (0x00189516, "StartAcquisitionDateTime", "X/D"),
    (0x00189517, "EndAcquisitionDateTime", "X/D"),
    (0x0018A002, "ContributionDateTime", "X"),
    (0x0018A003, "ContributionDescription", "X"),
    # relationships, frames of reference
    (0x00200010, "StudyID", "Z"),
    (0x0020000D, "StudyInstanceUID", "U"),
    (0x0020000E, "SeriesInstanceUID", "U"),
    (0x00200052, "FrameOfReferenceUID", "U"),
    (0x00200200, "SynchronizationFrameOfReferenceUID", "U"),
    (0x00204000, "ImageComments", "X"),
    (0x00209158, "FrameComments", "X"),
    (0x00209161, "ConcatenationUID", "U"),
    (0x00209164, "DimensionOrganizationUID", "U"),
    (0x00281214, "LargePaletteColorLookupTableUID", "U"),
    (0x00284000, "ImagePresentationComments", "X"),
    # study scheduling, visits, requests, procedure steps
    (0x00320012, "StudyIDIssuer", "X"),
    (0x00320032, "StudyVerifiedDate", "X"),
    (0x00320033, "StudyVerifiedTime", "X"),
    (0x00320034, "StudyReadDate", "X"),
    (0x00320035, "StudyReadTime", "X"),
    (0x00321000, "ScheduledStudyStartDate", "X"),
    (0x00321001, "ScheduledStudyStartTime", "X"),
    (0x00321010, "ScheduledStudyStopDate", "X"),
    (0x00321011, "ScheduledStudyStopTime", "X"),
    (0x00321020, "ScheduledStudyLocation", "X"),
    (0x00321021, "ScheduledStudyLocationAETitle", "X"),
    (0x00321030, "ReasonForStudy", "X"),
    (0x00321032, "RequestingPhysician", "X"),
    (0x00321033, "RequestingService", "X"),
    (0x00321040, "StudyArrivalDate", "X"),
    (0x00321041, "StudyArrivalTime", "X"),
    (0x00321050, "StudyCompletionDate", "X"),
    (0x00321051, "StudyCompletionTime", "X"),
    (0x00321060, "RequestedProcedureDescription", "X/Z"),
    (0x00321070, "RequestedContrastAgent", "X"),
    (0x00324000, "StudyComments", "X"),
    (0x00380010, "AdmissionID", "X"),
    (0x00380011, "IssuerOfAdmissionID", "X"),
    (0x00380014, "IssuerOfAdmissionIDSequence", "X"),
    (0x0038001A, "ScheduledAdmissionDate", "X"),
    (0x0038001B, "ScheduledAdmissionTime", "X"),
    (0x0038001C, "ScheduledDischargeDate", "X"),
    (0x0038001D, "ScheduledDischargeTime", "X"),
    (0x0038001E, "ScheduledPatientInstitutionResidence", "X"),
    (0x00380020, "AdmittingDate", "X"),
    (0x00380021, "AdmittingTime", "X"),
    (0x00380030, "DischargeDate", "X"),
    (0x00380032, "DischargeTime", "X"),
    (0x00380040, "DischargeDiagnosisDescription", "X"),
    (0x00380050, "SpecialNeeds", "X"),
    (0x00380060, "ServiceEpisodeID", "X"),
    (0x00380061, "IssuerOfServiceEpisodeID", "X"),
    (0x00380062, "ServiceEpisodeDescription", "X"),
    (0x00380064, "IssuerOfServiceEpisodeIDSequence", "X"),
    (0x00380300, "CurrentPatientLocation", "X"),
    (0x00380400, "PatientInstitutionResidence", "X"),
    (0x00380500, "PatientState", "X"),
    (0x00384000, "VisitComments", "X"),
    (0x00400001, "ScheduledStationAETitle", "X"),
    (0x00400002, "ScheduledProcedureStepStartDate", "X"),
    (0x00400003, "ScheduledProcedureStepStartTime", "X"),
    (0x00400004, "ScheduledProcedureStepEndDate", "X"),
    (0x00400005, "ScheduledProcedureStepEndTime", "X"),
    (0x00400006, "ScheduledPerformingPhysicianName", "X"),
    (0x00400007, "ScheduledProcedureStepDescription", "X"),
    (0x0040000B, "ScheduledPerformingPhysicianIdentificationSequence", "X"),
    (0x00400010, "ScheduledStationName", "X"),
    (0x00400011, "ScheduledProcedureStepLocation", "X"),
    (0x00400012, "PreMedication", "X"),
    (0x00400241, "PerformedStationAETitle", "X"),
    (0x00400242, "PerformedStationName", "X"),
    (0x00400243, "PerformedLocation", "X"),
    (0x00400244, "PerformedProcedureStepStartDate", "X"),
    (0x00400245, "PerformedProcedureStepStartTime", "X"),
    (0x00400250, "PerformedProcedureStepEndDate", "X"),
    (0x00400251, "PerformedProcedureStepEndTime", "X"),
    (0x00400253, "PerformedProcedureStepID", "X"),
    (0x00400254, "PerformedProcedureStepDescription", "X"),
    (0x00400275, "RequestAttributesSequence", "X"),
    (0x00400280, "CommentsOnThePerformedProcedureStep", "X"),
    (0x00400310, "CommentsOnRadiationDose", "X"),
    (0x00400555, "AcquisitionContextSequence", "X/Z"),
    (0x00401001, "RequestedProcedureID", "X"),
    (0x00401004, "PatientTransportArrangements", "X"),
    (0x00401005, "RequestedProcedureLocation", "X"),
    (0x00401010, "NamesOfIntendedRecipientsOfResults", "X"),
    (0x00401011, "IntendedRecipientsOfResultsIdentificationSequence", "X"),
    (0x00401101, "PersonIdentificationCodeSequence", "D"),
    (0x00401102, "PersonAddress", "X"),
    (0x00401103, "PersonTelephoneNumbers", "X"),
    (0x00401400, "RequestedProcedureComments", "X"),
    (0x00402001, "ReasonForTheImagingServiceRequest", "X"),
    (0x00402008, "OrderEnteredBy", "X"),
    (0x00402009, "OrderEntererLocation", "X"),
    (0x00402010, "OrderCallbackPhoneNumber", "X"),
    (0x00402011, "OrderCallbackTelecomInformation", "X"),
    (0x00402016, "PlacerOrderNumberImagingServiceRequest", "Z"),
    (0x00402017, "FillerOrderNumberImagingServiceRequest", "Z"),
    (0x00402400, "ImagingServiceRequestComments", "X"),
    (0x00403001, "ConfidentialityConstraintOnPatientDataDescription", "X"),
    (0x00404005, "ScheduledProcedureStepStartDateTime", "X"),
    (0x00404010, "ScheduledProcedureStepModificationDateTime", "X"),
    (0x00404011, "ExpectedCompletionDateTime", "X"),
    (0x00404023, "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID", "U"),
    (0x00404025, "ScheduledStationNameCodeSequence", "X"),
    (0x00404027, "ScheduledStationGeographicLocationCodeSequence", "X"),
    (0x00404028, "PerformedStationNameCodeSequence", "X"),
    (0x00404030, "PerformedStationGeographicLocationCodeSequence", "X"),
    (0x00404034, "ScheduledHumanPerformersSequence", "X"),
    (0x00404035, "ActualHumanPerformersSequence", "X"),
    (0x00404036, "HumanPerformerOrganization", "X"),
    (0x00404037, "HumanPerformerName", "X"),
    (0x00404050, "PerformedProcedureStepStartDateTime", "X"),
    (0x00404051, "PerformedProcedureStepEndDateTime", "X"),
    # structured content, observers, verification
    (0x0040A027, "VerifyingOrganization", "D"),
    (0x0040A030, "VerificationDateTime", "D"),
    (0x0040A032, "ObservationDateTime", "X/D"),
    (0x0040A073, "VerifyingObserverSequence", "D"),
    (0x0040A075, "VerifyingObserverName", "D"),
    (0x0040A078, "AuthorObserverSequence", "X"),
    (0x0040A07A, "ParticipantSequence", "X"),
    (0x0040A07C, "CustodialOrganizationSequence", "X"),
    (0x0040A088, "VerifyingObserverIdentificationCodeSequence", "Z"),
    (0x0040A120, "DateTime", "D"),
    (0x0040A121, "Date", "D"),
    (0x0040A122, "Time", "D"),
    (0x0040A123, "PersonName", "D"),
    (0x0040A124, "UID", "U"),
    (0x0040A171, "ObservationUID", "U"),
    (0x0040A730, "ContentSequence", "D"),
    (0x0040DB0C, "TemplateExtensionOrganizationUID", "U"),
    (0x0040DB0D, "TemplateExtensionCreatorUID", "U"),
    (0x00700001, "GraphicAnnotationSequence", "D"),
    (0x00700084, "ContentCreatorName", "Z/D"),
    (0x00700086, "ContentCreatorIdentificationCodeSequence", "X"),
    (0x0070031A, "FiducialUID", "U"),
    (0x00880140, "StorageMediaFileSetUID", "U"),
    (0x00880200, "IconImageSequence", "X"),
    (0x00880904, "TopicTitle", "X"),
    (0x00880906, "TopicSubject", "X"),
    (0x00880910, "TopicAuthor", "X"),
    (0x00880912, "TopicKeywords", "X"),
    (0x01000420, "SOPAuthorizationDateTime", "X"),
    (0x04000100, "DigitalSignatureUID", "U"),
    (0x04000105, "DigitalSignatureDateTime", "D"),
    (0x04000310, "CertifiedTimestamp", "X"),
    (0x04000402, "ReferencedDigitalSignatureSequence", "X"),
    (0x04000403, "ReferencedSOPInstanceMACSequence", "X"),
    (0x04000404, "MAC", "X"),
    (0x04000550, "ModifiedAttributesSequence", "X"),
    (0x04000561, "OriginalAttributesSequence", "X"),
    (0x20300020, "TextString", "X"),
    (0x30060024, "ReferencedFrameOfReferenceUID", "U"),
    (0x300600C2, "RelatedFrameOfReferenceUID", "U"),
    (0x300A0013, "DoseReferenceUID", "U"),
    (0x300E0008, "ReviewerName", "X/Z"),
    (0x40000010, "Arbitrary", "X"),
    (0x40004000, "TextComments", "X"),
    (0x40080042, "ResultsIDIssuer", "X"),
    (0x40080102, "InterpretationRecorder", "X"),
    (0x4008010A, "InterpretationTranscriber", "X"),
    (0x4008010B, "InterpretationText", "X"),
    (0x4008010C, "InterpretationAuthor", "X"),
    (0x40080111, "InterpretationApproverSequence", "X"),
    (0x40080114, "PhysicianApprovingInterpretation", "X"),
    (0x40080115, "InterpretationDiagnosisDescription", "X"),
    (0x40080118, "ResultsDistributionListSequence", "X"),
    (0x40080119, "DistributionName", "X"),
    (0x4008011A, "DistributionAddress", "X"),
    (0x40080202, "InterpretationIDIssuer", "X"),
    (0x40080300, "Impressions", "X"),
    (0x40084000, "ResultsComments", "X"),
    (0xFFFAFFFA, "DigitalSignaturesSequence", "X"),
    (0xFFFCFFFC, "DataSetTrailingPadding", "X"),
    # further rows of the 2024b table
    (0x00080017, "AcquisitionUID", "U"),
    (0x00080019, "PyramidUID", "U"),
    (0x00080054, "RetrieveAETitle", "X"),
    (0x00080055, "StationAETitle", "X"),
    (0x00080106, "ContextGroupVersion", "D"),
    (0x00080107, "ContextGroupLocalVersion", "D"),
    (0x00081000, "NetworkID", "X"),
    (0x00081041, "InstitutionalDepartmentTypeCodeSequence", "X"),
    (0x00081088, "PyramidDescription", "X"),
    (0x00120022, "IssuerOfClinicalTrialProtocolID", "X"),
    (0x00120023, "OtherClinicalTrialProtocolIDsSequence", "X"),
    (0x00120032, "IssuerOfClinicalTrialSiteID", "X"),
    (0x00120041, "IssuerOfClinicalTrialSubjectID", "X"),
    (0x00120043, "IssuerOfClinicalTrialSubjectReadingID", "X"),
    (0x00120055, "IssuerOfClinicalTrialTimePointID", "X"),
    (0x00120073, "IssuerOfClinicalTrialSeriesID", "X"),
    (0x00120086, "EthicsCommitteeApprovalEffectivenessStartDate", "X"),
    (0x00120087, "EthicsCommitteeApprovalEffectivenessEndDate", "X"),
    (0x0014407C, "CalibrationTime", "X"),
    (0x0014407E, "CalibrationDate", "X"),
    (0x0016004B, "DeviceSettingDescription", "X"),
    (0x0016004E, "LensSpecification", "X"),
    (0x0016004F, "LensMake", "X"),
    (0x00160050, "LensModel", "X"),
    (0x00180027, "InterventionDrugStopTime", "X"),
    (0x00180035, "InterventionDrugStartTime", "X"),
    (0x00181009, "UniqueDeviceIdentifier", "X"),
    (0x0018100A, "UDISequence", "X"),
    (0x0018100B, "ManufacturerDeviceClassUID", "U"),
    (0x00181042, "ContrastBolusStartTime", "X"),
    (0x00181043, "ContrastBolusStopTime", "X"),
    (0x001811BB, "AcquisitionFieldOfViewLabel", "D"),
    (0x00181203, "CalibrationDateTime", "Z"),
    (0x00181204, "DateOfManufacture", "X"),
    (0x00181205, "DateOfInstallation", "X"),
    (0x00182042, "TargetUID", "U"),
    (0x00185011, "TransducerIdentificationSequence", "X"),
    (0x0018700C, "DateOfLastDetectorCalibration", "X/D"),
    (0x0018700E, "TimeOfLastDetectorCalibration", "X/D"),
    (0x00189185, "RespiratoryMotionCompensationTechniqueDescription", "X"),
    (0x00189369, "SourceStartDateTime", "D"),
    (0x0018936A, "SourceEndDateTime", "D"),
    (0x0018937B, "MultienergyAcquisitionDescription", "X"),
    (0x0018937F, "DecompositionDescription", "X"),
    (0x00189623, "FunctionalSyncPulse", "D"),
    (0x00189701, "DecayCorrectionDateTime", "D"),
    (0x00189804, "ExclusionStartDateTime", "D"),
    (0x00189919, "InstructionPerformedDateTime", "Z/D"),
    (0x00189937, "RequestedSeriesDescription", "X"),
    (0x00200027, "PyramidLabel", "X"),
    (0x00203401, "ModifyingDeviceID", "X"),
    (0x00203403, "ModifiedImageDate", "X"),
    (0x00203405, "ModifiedImageTime", "X"),
    (0x00203406, "ModifiedImageDescription", "X"),
    (0x00281199, "PaletteColorLookupTableUID", "U"),
    (0x00321066, "ReasonForVisit", "X"),
    (0x00321067, "ReasonForVisitCodeSequence", "X"),
    (0x00380004, "ReferencedPatientAliasSequence", "X"),
    (0x00400009, "ScheduledProcedureStepID", "X"),
    (0x0040050A, "SpecimenAccessionNumber", "X"),
    (0x00400512, "ContainerIdentifier", "D"),
    (0x00400513, "IssuerOfTheContainerIdentifierSequence", "Z"),
    (0x0040051A, "ContainerDescription", "X"),
    (0x00400551, "SpecimenIdentifier", "D"),
    (0x00400554, "SpecimenUID", "U"),
    (0x00400562, "IssuerOfTheSpecimenIdentifierSequence", "Z"),
    (0x00400600, "SpecimenShortDescription", "X"),
    (0x00400602, "SpecimenDetailedDescription", "X"),
    (0x00400610, "SpecimenPreparationSequence", "Z"),
    (0x004006FA, "SlideIdentifier", "X"),
    (0x00401002, "ReasonForTheRequestedProcedure", "X"),
    (0x0040100A, "ReasonForRequestedProcedureCodeSequence", "X"),
    (0x00401104, "PersonTelecomInformation", "X"),
    (0x00402004, "IssueDateOfImagingServiceRequest", "X"),
    (0x00402005, "IssueTimeOfImagingServiceRequest", "X"),
    (0x00404008, "ScheduledProcedureStepExpirationDateTime", "X"),
    (0x00404052, "ProcedureStepCancellationDateTime", "X"),
    (0x0040A033, "ObservationStartDateTime", "X"),
    (0x0040A082, "ParticipationDateTime", "Z"),
    (0x0040A13A, "ReferencedDateTime", "D"),
    (0x0040DB06, "TemplateVersion", "X"),
    (0x0040DB07, "TemplateLocalVersion", "X"),
    (0x0040E004, "HL7DocumentEffectiveTime", "X"),
    (0x00420011, "EncapsulatedDocument", "D"),
    (0x00440004, "ApprovalStatusDateTime", "X"),
    (0x0044000B, "ProductExpirationDateTime", "X"),
    (0x00440010, "SubstanceAdministrationDateTime", "X"),
    (0x00440104, "AssertionDateTime", "D"),
    (0x00440105, "AssertionExpirationDateTime", "X"),
    (0x00620021, "TrackingUID", "U"),
    (0x00640003, "SourceFrameOfReferenceUID", "U"),
    (0x00686226, "EffectiveDateTime", "D"),
    (0x00686270, "InformationIssueDateTime", "D"),
    (0x00700082, "PresentationCreationDate", "X"),
    (0x00700083, "PresentationCreationTime", "X"),
    (0x00701101, "PresentationDisplayCollectionUID", "U"),
    (0x00701102, "PresentationSequenceCollectionUID", "U"),
    (0x0072000A, "HangingProtocolCreationDateTime", "D"),
    (0x00741234, "ReceivingAE", "X"),
    (0x00741236, "RequestingAE", "X"),
    (0x04000115, "CertificateOfSigner", "D"),
    (0x04000551, "NonconformingModifiedAttributesSequence", "X"),
    (0x04000552, "NonconformingDataElementValue", "X"),
    (0x04000562, "AttributeModificationDateTime", "D"),
    (0x04000563, "ModifyingSystem", "D"),
    (0x04000564, "SourceOfPreviousValues", "Z"),
    (0x04000565, "ReasonForTheAttributeModification", "D"),
    (0x04000600, "InstanceOriginStatus", "X"),
    (0x21000040, "CreationDate", "X"),
    (0x21000050, "CreationTime", "X"),
    (0x21000070, "Originator", "X"),
    (0x21000140, "DestinationAE", "D"),
    (0x22000002, "LabelText", "X/Z"),
    (0x22000005, "BarcodeValue", "X/Z"),
    # RT objects (pydicom's test files include RT plan, dose and structure sets)
    (0x30060002, "StructureSetLabel", "D"),
    (0x30060004, "StructureSetName", "X"),
    (0x30060006, "StructureSetDescription", "X"),
    (0x30060008, "StructureSetDate", "Z"),
    (0x30060009, "StructureSetTime", "Z"),
    (0x30060026, "ROIName", "Z"),
    (0x30060028, "ROIDescription", "X"),
    (0x3006002D, "ROIDateTime", "X"),
    (0x30060038, "ROIGenerationDescription", "X"),
    (0x30060085, "ROIObservationLabel", "X"),
    (0x30060088, "ROIObservationDescription", "X"),
    (0x300600A6, "ROIInterpreter", "Z"),
    (0x30080024, "TreatmentControlPointDate", "D"),
    (0x30080025, "TreatmentControlPointTime", "D"),
    (0x30080054, "FirstTreatmentDate", "X/D"),
    (0x30080056, "MostRecentTreatmentDate", "X/D"),
    (0x30080105, "SourceSerialNumber", "X/Z"),
    (0x30080250, "TreatmentDate", "X/D"),
    (0x30080251, "TreatmentTime", "X/D"),
    (0x300A0002, "RTPlanLabel", "D"),
    (0x300A0003, "RTPlanName", "X"),
    (0x300A0004, "RTPlanDescription", "X"),
    (0x300A0006, "RTPlanDate", "X/D"),
    (0x300A0007, "RTPlanTime", "X/D"),
    (0x300A000B, "TreatmentSites", "X"),
    (0x300A000E, "PrescriptionDescription", "X"),
    (0x300A0016, "DoseReferenceDescription", "X"),
    (0x300A0072, "FractionGroupDescription", "X"),
    (0x300A0083, "ReferencedDoseReferenceUID", "U"),
    (0x300A00B2, "TreatmentMachineName", "X/Z"),
    (0x300A00C3, "BeamDescription", "X"),
    (0x300A00DD, "BolusDescription", "X"),
    (0x300A0196, "FixationDeviceDescription", "X"),
    (0x300A01A6, "ShieldingDeviceDescription", "X"),
    (0x300A01B2, "SetupTechniqueDescription", "X"),
    (0x300A0216, "SourceManufacturer", "X"),
    (0x300A022C, "SourceStrengthReferenceDate", "D"),
    (0x300A022E, "SourceStrengthReferenceTime", "D"),
    (0x300A02EB, "CompensatorDescription", "X"),
    (0x300E0004, "ReviewDate", "Z"),
    (0x300E0005, "ReviewTime", "Z"),
)

# Beyond the table (stricter): birth and death dates in an alternative calendar are as identifying
# as Patient's Birth Date, whatever the edition.
_STRICTER_ROWS: tuple[tuple[int, str, str], ...] = (
    (0x00100033, "PatientBirthDateInAlternativeCalendar", "X"),
    (0x00100034, "PatientDeathDateInAlternativeCalendar", "X"),
    (0x00100035, "PatientAlternativeCalendar", "X"),
)

#: PS3.15 Table E.1-1 (Basic Profile column): tag -> (keyword, action as printed in the standard).
BASIC_PROFILE: dict[int, tuple[str, str]] = {tag: (kw, action) for tag, kw, action in _E11_ROWS}
# What `deidentify` applies: the table plus the stricter rows.
_ACTIONS: dict[int, tuple[str, str]] = {**BASIC_PROFILE, **{t: (kw, a) for t, kw, a in _STRICTER_ROWS}}

# In the file meta group the only identifying elements are the instance UID (U) and the AE titles
# of whoever sent or stored the file; the meta group is rebuilt rather than cleaned.
_META_KEEP = ("MediaStorageSOPClassUID", "TransferSyntaxUID")

# Dummy values for action D, by VR: plainly not real, valid for the VR's length/charset rules.
_DUMMY_TEXT = "DEIDENTIFIED"
#: Dummy value written for action D, by VR (numeric VRs get 0, others are emptied).
DUMMY_VALUES: dict[str, Any] = {
    "AE": _DUMMY_TEXT, "AS": "000Y", "CS": _DUMMY_TEXT, "DA": "19000101", "DT": "19000101000000",
    "DS": "0", "IS": "0", "LO": _DUMMY_TEXT, "LT": _DUMMY_TEXT, "PN": _DUMMY_TEXT, "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT, "TM": "000000", "UC": _DUMMY_TEXT, "UT": _DUMMY_TEXT,
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0,
}  # fmt: skip
# Outside the table, values of these VRs are emptied anyway: every person name, date and time is
# identifying or a re-identification key, whichever attribute holds it (stricter than the profile).
_ALWAYS_EMPTY_VRS = frozenset({"PN", "DA", "DT", "TM", "AS"})
# Free-text VRs: inside a sequence whose action is D they get the dummy value.
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "UR", "AE"})
# UI values that name a standard thing (a class, a syntax, a coding scheme), not an instance; kept.
_KEPT_UID_KEYWORDS = frozenset(
    {"TransferSyntaxUID", "ReferencedTransferSyntaxUIDInFile", "CodingSchemeUID", "ContextUID",
     "MappingResourceUID", "ImplementationClassUID"}
)  # fmt: skip

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LATERALITY = frozenset({"L", "R"})
# Bounds from the DICOM VRs the values are written into (PS3.5 Table 6.2-1).
_MAX_LO = 64
_MAX_ST = 1024
_MAX_LT = 10240


@dataclass(frozen=True)
class WrittenDicom:
    """What `write_synthetic_dicom` / `export_derived_dicom` wrote: the file and its new UIDs."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


# --- synthetic images ----------------------------------------------------------------------------


def write_synthetic_dicom(
    rgb_uint8: np.ndarray,
    path: str | Path,
    *,
    model_name: str,
    checkpoint_sha256: str,
    seed: int,
    grade: int | None,
    codes: Mapping[str, float],
    laterality: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    created: datetime | None = None,
    overwrite: bool = False,
) -> WrittenDicom:
    """Write one generated fundus image as a Secondary Capture DICOM file marked synthetic.

    Args:
        rgb_uint8: [H, W, 3] uint8 RGB in [0, 255], 1 <= H, W <= 65535 (the generator's output).
        path: output file; its folder is created. An existing file is an error unless `overwrite`.
        model_name: the generator's name (e.g. "InfoStyleGAN MSI(1,1,0)"), <= 64 printable chars.
        checkpoint_sha256: sha256 of the checkpoint tensors, 64 lowercase hex digits.
        seed: the image seed (>= 0) that reproduces the latent sample.
        grade: the DR grade (0..4) the image was conditioned on, or None for an unconditional model.
        codes: latent code name -> value (finite numbers) used for the image, e.g. {"c0": 2, "c5": 0.8}.
        laterality: "L"/"R" written as Image Laterality (0020,0062) when the model controls it.
        study_instance_uid, series_instance_uid: pass the same values (e.g. `generate_uid(None)`)
            to group a batch into one study/series; fresh UIDs are generated when None.
        instance_number: Instance Number (0020,0013), >= 1.
        created: creation time written as Content/Instance Creation/Study/Series date and time (the
            only dates in the file); default now (UTC).
        overwrite: replace an existing file.

    Returns:
        `WrittenDicom` with the path and the UIDs written.

    The file holds: SOP class Secondary Capture Image Storage, Conversion Type SYN, Modality OT,
    Synthetic Data (0008,001C) YES, Image Type DERIVED\\SECONDARY, Burned In Annotation NO,
    Recognizable Visual Features NO, Derivation Description naming model, checkpoint hash, seed and
    grade, Image Comments with the full provenance as JSON (codes included), Patient's Name and
    Patient ID "SYNTHETIC", no other patient attribute values, fresh 2.25 (UUID-derived) UIDs.
    The pixels are not reproducible from the file's bytes alone (UIDs and dates differ per write)
    but are exactly `rgb_uint8`.

    Raises:
        ValueError: bad array (shape, dtype, size) or provenance argument.
        BadInputError: the file cannot be written (folder not creatable/writable, target exists or is
            a folder); nothing is left at `path` or beside it.
    """
    arr = _check_rgb(rgb_uint8)
    _check_text("model_name", model_name, _MAX_LO)
    if not isinstance(checkpoint_sha256, str) or not _SHA256.match(checkpoint_sha256):
        raise ValueError("checkpoint_sha256 must be 64 lowercase hex digits (a sha256 hexdigest)")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if grade is not None and (
        isinstance(grade, bool) or not isinstance(grade, int | np.integer) or not 0 <= grade <= 4
    ):
        raise ValueError(f"grade must be a DR grade 0..4 or None, got {grade!r}")
    clean_codes = _check_codes(codes)
    if laterality is not None and laterality not in _LATERALITY:
        raise ValueError(f"laterality must be 'L', 'R' or None, got {laterality!r}")
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or instance_number < 1:
        raise ValueError(f"instance_number must be an integer >= 1, got {instance_number!r}")
    study_uid = _check_or_new_uid("study_instance_uid", study_instance_uid)
    series_uid = _check_or_new_uid("series_instance_uid", series_instance_uid)
    when = _creation_time(created)

    grade_text = "none (unconditional)" if grade is None else str(int(grade))
    derivation = (
        f"Synthetic fundus image generated by retinagen {__version__}, model {model_name}, "
        f"checkpoint sha256 {checkpoint_sha256}, seed {int(seed)}, DR grade {grade_text}; "
        "latent codes in Image Comments (JSON)"
    )
    provenance = {
        "generator": "retinagen",
        "version": __version__,
        "model": model_name,
        "checkpoint_sha256": checkpoint_sha256,
        "seed": int(seed),
        "grade": None if grade is None else int(grade),
        "codes": clean_codes,
        "synthetic": True,
    }
    comments = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    if len(comments) > _MAX_LT:
        raise ValueError(
            f"provenance JSON is {len(comments)} characters, more than Image Comments holds ({_MAX_LT})"
        )

    sop_uid = _new_uid()
    ds = _secondary_capture(sop_uid, study_uid, series_uid, when)
    ds.PatientName = SYNTHETIC_PATIENT
    ds.PatientID = SYNTHETIC_PATIENT
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _da(when)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _tm(when)
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "retinagen synthetic fundus images"
    ds.SeriesDescription = f"synthetic, DR grade {grade_text}"[:_MAX_LO]
    ds.Modality = "OT"
    ds.ConversionType = "SYN"  # SC Equipment: "Synthetic Image"
    ds.SyntheticData = "YES"
    ds.RecognizableVisualFeatures = "NO"  # no patient behind the image to recognise
    ds.DerivationDescription = derivation
    ds.ImageComments = comments
    ds.InstanceNumber = instance_number
    if laterality is not None:
        ds.ImageLaterality = laterality
    _set_rgb_pixels(ds, arr)
    _write(ds, Path(path), overwrite)
    return WrittenDicom(Path(path), sop_uid, series_uid, study_uid)


# --- de-identification ---------------------------------------------------------------------------


def deidentify(ds: Dataset, *, uid_map: MutableMapping[str, str] | None = None) -> Dataset:
    """Return a de-identified copy of `ds` (PS3.15 Annex E Basic Profile); `ds` is not changed.

    What is done, recursively into every sequence item:

    * every attribute of `BASIC_PROFILE` is removed (X), emptied (Z), given a dummy value (D:
      `DUMMY_VALUES` by VR, e.g. ``DEIDENTIFIED``, ``19000101``) or has its UID replaced (U). Where
      the standard allows several actions ("X/Z/D": whichever the IOD needs) the one that keeps the
      most IODs valid is used: U, else D, else Z, else X (so Patient ID, Z/D, becomes
      ``DEIDENTIFIED``). A sequence with action D (e.g. Content Sequence) keeps its items, but every
      text value in them, free text and code values alike, gets the dummy value;
    * all private attributes (odd groups, creators included), curves (50xx), overlays (60xx),
      group lengths, command/meta elements misplaced in the body, and public attributes of VR UN
      (not in the data dictionary, so not classifiable) are removed;
    * stricter than the profile: every other person name, age, date, time and date-time is emptied,
      every other UID that is not a well-known standard UID (SOP classes, transfer syntaxes, coding
      schemes) is replaced, and birth/death dates in alternative calendars are removed;
    * UIDs are replaced by new 2.25 (UUID-derived) UIDs through `uid_map`: the same input UID always
      gets the same new UID, so references inside a file and, when the caller passes one dict for
      several files, across files (one study's images stay one study) still match. The map links old
      to new UIDs: keep it secret or discard it;
    * Patient Identity Removed (0012,0062) = YES, De-identification Method (0012,0063) and
      De-identification Method Code Sequence (0012,0064) with 113100 (Basic Application
      Confidentiality Profile, DCM) are added (existing entries are kept: an earlier tool's options
      stay recorded), Longitudinal Temporal Information Modified (0028,0303) = REMOVED;
    * the file meta group keeps Media Storage SOP Class UID and Transfer Syntax UID, gets the new
      Media Storage SOP Instance UID, and drops everything else (source AE titles, private info).

    Pixel data are copied unchanged, so a dataset whose Burned In Annotation (0028,0301) is YES is
    refused: the profile then requires the Clean Pixel Data option, which is not implemented. A
    DICOMDIR is refused too (its Referenced File IDs are folder names, often patient IDs). The
    returned object is a plain `Dataset` (no file name of the original attached); with a file meta
    group holding a Transfer Syntax UID, `save_as(..., enforce_file_format=True)` writes it.

    Args:
        ds: a dataset as read by `pydicom.dcmread` (any modality, any transfer syntax).
        uid_map: old UID -> new UID, filled in as UIDs are met; default a fresh dict for this call.

    Raises:
        DicomError: Burned In Annotation is YES, or `ds` is a DICOMDIR. Messages never quote values.
    """
    if uid_map is None:
        uid_map = {}
    silence_pydicom()  # value warnings quote element values (patient data among them)
    meta = getattr(ds, "file_meta", None)
    sop_classes = {_raw_text(ds, 0x00080016), _raw_text(meta, 0x00020002) if meta is not None else ""}
    if dcm_uid.MediaStorageDirectoryStorage in sop_classes:
        raise DicomError(
            None,
            "a DICOMDIR (Media Storage Directory) is a file-set index whose file paths may be patient "
            "IDs; de-identify the files it lists and build a new DICOMDIR instead",
        )
    burned = _raw_text(ds, 0x00280301).upper()
    if burned == "YES":
        raise DicomError(
            None,
            "Burned In Annotation (0028,0301) is YES: the pixels may show patient identity; the Basic "
            "Profile then needs the Clean Pixel Data option, which retinagen does not implement",
        )
    work = copy.deepcopy(ds)
    # Cleaned while still a FileDataset, so values deferred by dcmread(defer_size=...) can be
    # read from the source file; the kept ones are read in before the file name is dropped.
    _clean_dataset(work, uid_map, strict=False)
    _load_deferred(work)
    # Dataset(other) shares `other`'s element dict: a plain Dataset over the private copy, which
    # drops FileDataset's file name, timestamp and preamble (a path can name the patient).
    out = Dataset(work)
    _add_deidentification_record(out)
    if meta is not None:
        out.file_meta = _clean_file_meta(meta, out, uid_map)
    return out


def export_derived_dicom(
    source_dicom_path: str | Path,
    rgb_uint8: np.ndarray,
    out_path: str | Path,
    *,
    derivation_description: str,
    uid_map: MutableMapping[str, str] | None = None,
    created: datetime | None = None,
    overwrite: bool = False,
) -> WrittenDicom:
    """Write an image computed from a real DICOM file (e.g. its preprocessed fundus) de-identified.

    The source's header (never its pixels) is read and passed through `deidentify` with `uid_map`;
    the output is a new Secondary Capture instance (Conversion Type WSD, Image Type
    DERIVED\\SECONDARY, Synthetic Data NO) in a new series of the source's de-identified study. It
    keeps from the source only: the Patient module as emptied by the profile, the re-mapped Study
    Instance UID, the emptied study identifiers and dates, Modality, laterality and body part; the
    Source Image Sequence references the source's SOP class and its *re-mapped* SOP Instance UID, so
    with one shared `uid_map` the derived image points at the de-identified copy of its source.

    The caller vouches that `rgb_uint8` shows no burned-in text (Burned In Annotation NO is written;
    retinagen's fundus preprocessing keeps only the circular field of view, where cameras do not
    print text). A source marked Burned In Annotation YES is refused. Recognizable Visual Features
    is written YES: a retina's vessel pattern is a biometric, which the Basic Profile does not clean.

    Args:
        source_dicom_path: the real DICOM file the image was computed from.
        rgb_uint8: [H, W, 3] uint8 RGB in [0, 255].
        out_path: output file (folder created; existing file an error unless `overwrite`).
        derivation_description: what was done to the source, e.g. "crop to field of view, resize
            512", <= 1024 characters (stored verbatim: put no patient data in it).
        uid_map: old -> new UID map shared with `deidentify` calls for the same study (see there).
        created: creation time for Content/Instance Creation date and time; default now (UTC).
        overwrite: replace an existing file.

    Raises:
        ValueError: bad array or description.
        DicomError: the source cannot be read as DICOM, or is marked Burned In Annotation YES.
        BadInputError: the output cannot be written (nothing is left behind).
    """
    arr = _check_rgb(rgb_uint8)
    _check_text("derivation_description", derivation_description, _MAX_ST)
    if uid_map is None:
        uid_map = {}
    when = _creation_time(created)
    source = _read_header(Path(source_dicom_path))
    clean = deidentify(source, uid_map=uid_map)

    study_uid = str(clean.get("StudyInstanceUID", "") or "") or _new_uid()
    series_uid = _new_uid()
    sop_uid = _new_uid()
    ds = _secondary_capture(sop_uid, study_uid, series_uid, when)
    # Type 2 patient/study attributes: present, with whatever the profile left (empty).
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    ):  # fmt: skip
        setattr(ds, keyword, element_text(clean, keyword))
    ds.ContentDate = _da(when)
    ds.ContentTime = _tm(when)
    modality = element_text(clean, "Modality").upper()
    ds.Modality = modality if modality else "OT"
    for keyword in ("ImageLaterality", "Laterality", "BodyPartExamined"):
        value = element_text(clean, keyword)
        if value:
            setattr(ds, keyword, value)
    for keyword in (
        "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    ):  # fmt: skip
        if keyword in clean:
            ds[keyword] = copy.deepcopy(clean[keyword])
    source_class = str(clean.get("SOPClassUID", "") or "")
    source_instance = str(clean.get("SOPInstanceUID", "") or "")
    if source_class and source_instance:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source_class
        ref.ReferencedSOPInstanceUID = source_instance
        ds.SourceImageSequence = Sequence([ref])
    ds.ConversionType = "WSD"  # SC Equipment: "Workstation" (computed from an existing image)
    ds.SyntheticData = "NO"
    ds.RecognizableVisualFeatures = "YES"
    ds.DerivationDescription = derivation_description
    ds.SeriesDescription = "retinagen derived image"
    ds.InstanceNumber = 1
    _set_rgb_pixels(ds, arr)
    _write(ds, Path(out_path), overwrite)
    return WrittenDicom(Path(out_path), sop_uid, series_uid, study_uid)


# --- helpers: argument checks --------------------------------------------------------------------


def _check_rgb(rgb: Any) -> np.ndarray:
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"image must be a numpy array [H, W, 3] uint8, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {tuple(rgb.shape)}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"image must be uint8 in [0, 255], got dtype {rgb.dtype}")
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    if not (1 <= h <= 65535 and 1 <= w <= 65535):  # Rows/Columns are US
        raise ValueError(f"image size {h}x{w} is outside DICOM's 1..65535 rows/columns")
    return np.ascontiguousarray(rgb)


def _check_text(name: str, value: Any, max_len: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > max_len:
        raise ValueError(f"{name} is {len(value)} characters, the DICOM field holds at most {max_len}")
    if any(ch in value for ch in "\\\r\n\t\x00"):
        # A backslash is DICOM's value separator; control characters are not allowed in LO/ST.
        raise ValueError(f"{name} must not contain backslashes or control characters")


def _check_codes(codes: Any) -> dict[str, float | int]:
    if not isinstance(codes, Mapping):
        raise ValueError(f"codes must be a mapping name -> number, got {type(codes).__name__}")
    clean: dict[str, float | int] = {}
    for key, value in codes.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"code names must be non-empty strings, got {key!r}")
        if isinstance(value, bool | np.bool_):
            clean[key] = int(value)
            continue
        if isinstance(value, int | np.integer):
            clean[key] = int(value)
            continue
        if isinstance(value, float | np.floating) and math.isfinite(float(value)):
            clean[key] = float(value)
            continue
        raise ValueError(f"code {key!r} must be a finite number, got {value!r}")
    return clean


def _check_or_new_uid(name: str, value: str | None) -> str:
    if value is None:
        return _new_uid()
    if not isinstance(value, str) or not dcm_uid.UID(value).is_valid:
        raise ValueError(f"{name} must be a valid DICOM UID (digits and dots, <= 64 chars)")
    return value


def _creation_time(created: datetime | None) -> datetime:
    if created is None:
        return datetime.now(timezone.utc)
    if not isinstance(created, datetime):
        raise ValueError(f"created must be a datetime, got {type(created).__name__}")
    return created


def _new_uid() -> str:
    # prefix=None: "2.25." + the integer of a random UUID (ISO/IEC 9834-8); needs no org root.
    return str(dcm_uid.generate_uid(prefix=None))


def _da(when: datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: datetime) -> str:
    return when.strftime("%H%M%S")


# --- helpers: building and writing ---------------------------------------------------------------


def _secondary_capture(sop_uid: str, study_uid: str, series_uid: str, when: datetime) -> Dataset:
    """The modules every output shares: SOP Common, General Series/Image, General/SC Equipment."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dcm_uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: model names and descriptions are free text
    ds.SOPClassUID = dcm_uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceCreationDate = _da(when)
    ds.InstanceCreationTime = _tm(when)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesNumber = 1
    ds.PatientOrientation = ""
    ds.Manufacturer = "retinagen"
    ds.SoftwareVersions = __version__
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"  # pixels stored uncompressed, as given
    return ds


def _set_rgb_pixels(ds: Dataset, arr: np.ndarray) -> None:
    # Rows, Columns, Samples per Pixel 3, Planar Configuration 0, Bits 8/8/7, unsigned.
    ds.set_pixel_data(arr, "RGB", 8, generate_instance_uid=False)


def _write(ds: Dataset, path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise BadInputError(path, "output path is an existing folder, not a file")
    if path.exists() and not overwrite:
        raise BadInputError(path, "output file already exists (pass overwrite=True to replace it)")

    def writer(tmp: Path) -> None:
        ds.save_as(tmp, enforce_file_format=True)

    try:
        atomic_write_with(path, writer)
    except OSError as exc:
        # atomic_write_with removed its temporary file; OSError messages quote only paths.
        raise BadInputError(
            path,
            f"could not write the DICOM file into folder {path.parent} ({type(exc).__name__}: {exc.strerror})",
        ) from exc


def _read_header(path: Path) -> Dataset:
    if not path.is_file():
        raise DicomError(path, "source DICOM file does not exist or is not a regular file")
    silence_pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except pydicom.errors.InvalidDicomError:
        raise DicomError(
            path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
        ) from None
    except Exception as exc:
        # The library's message could quote file content: only its type is forwarded.
        raise DicomError(path, f"malformed DICOM header ({type(exc).__name__})") from None




# --- helpers: de-identification ------------------------------------------------------------------


def _resolve_action(action: str) -> str:
    """One concrete action for a table entry: U, else D, else Z, else X (see `deidentify`)."""
    options = set(action.replace("*", "").split("/"))
    for choice in ("U", "D", "Z", "X"):
        if choice in options:
            return choice
    raise AssertionError(f"unknown profile action {action!r}")


def _is_repeating_group_to_drop(tag: BaseTag) -> bool:
    group = tag.group
    return (0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF) and group % 2 == 0


def _vr_of(tag: BaseTag, elem: DataElement | RawDataElement) -> str:
    """The element's VR; for implicit-VR or UN raw elements, the dictionary's ("UN" if unknown)."""
    vr = elem.VR
    if vr in (None, "UN"):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"
    return str(vr)


def _raw_text(ds: Dataset, tag: int) -> str:
    """A short text value read without pydicom's value conversion (which may log the value)."""
    if tag not in ds:
        return ""
    elem = ds.get_item(tag)
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _uid_values(elem: DataElement | RawDataElement) -> list[str]:
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes):
        parts = value.decode("ascii", "replace").split("\\")
    elif isinstance(value, MultiValue | list | tuple):
        parts = [str(v) for v in value]
    else:
        parts = str(value).split("\\")
    return [p.strip("\x00 ") for p in parts]


def _map_uid(old: str, uid_map: MutableMapping[str, str]) -> str:
    if not old:
        return old
    new = uid_map.get(old)
    if new is None:
        new = _new_uid()
        uid_map[old] = new
    return new


def _replace_uids(
    dset: Dataset, tag: BaseTag, elem: DataElement | RawDataElement, uid_map: MutableMapping[str, str]
) -> None:
    new = [_map_uid(v, uid_map) for v in _uid_values(elem)]
    value: Any = new[0] if len(new) == 1 else (new or "")
    dset[tag] = DataElement(tag, "UI", value)


def _keeps_uid(tag: BaseTag, value: str) -> bool:
    """A UI value outside the table is kept if it names a standard thing, not an instance."""
    keyword = keyword_for_tag(tag)
    return keyword.endswith("ClassUID") or keyword in _KEPT_UID_KEYWORDS or value in dcm_uid.UID_dictionary


def _set_value(dset: Dataset, tag: BaseTag, vr: str, value: Any) -> None:
    # A new element replaces the old without converting (and possibly logging) the old value.
    dset[tag] = DataElement(tag, vr, value)


def _empty(dset: Dataset, tag: BaseTag, vr: str) -> None:
    if vr == "SQ":
        _set_value(dset, tag, vr, Sequence([]))
    elif vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
        _set_value(dset, tag, vr, b"")
    else:
        _set_value(dset, tag, vr, None)


def _dummy(dset: Dataset, tag: BaseTag, vr: str) -> None:
    if vr in DUMMY_VALUES:
        _set_value(dset, tag, vr, DUMMY_VALUES[vr])
    else:
        _empty(dset, tag, vr)


def _clean_dataset(dset: Dataset, uid_map: MutableMapping[str, str], *, strict: bool) -> None:
    """De-identify `dset` in place, recursing into sequences (see `deidentify`).

    strict: inside a sequence whose action is D: free text gets the dummy value too.
    """
    for tag in sorted(dset.keys()):
        tag = Tag(tag)
        if (
            tag.is_private
            or tag.element == 0x0000  # group lengths: stale after editing
            or tag.group in (0x0000, 0x0002)  # command / meta elements do not belong in the body
            or _is_repeating_group_to_drop(tag)
        ):
            del dset[tag]
            continue
        # keep_deferred: a large value to be removed is never read (nor converted, nor logged).
        elem = dset.get_item(tag, keep_deferred=True)
        vr = _vr_of(tag, elem)
        row = _ACTIONS.get(int(tag))
        if row is not None:
            action = _resolve_action(row[1])
            if action == "X":
                del dset[tag]
            elif action == "Z":
                _empty(dset, tag, vr)
            elif action == "U" and vr != "SQ":
                _replace_uids(dset, tag, elem, uid_map)
            elif vr == "SQ":  # U* or D on a sequence: keep the items, clean them
                _clean_sequence(dset, tag, uid_map, strict=strict or action == "D")
            else:  # D
                _dummy(dset, tag, vr)
            continue
        if vr == "UN":
            del dset[tag]  # not in the dictionary: cannot tell whether it identifies
        elif vr == "SQ":
            _clean_sequence(dset, tag, uid_map, strict=strict)
        elif vr == "UI":
            values = _uid_values(elem)
            if not all(_keeps_uid(tag, v) for v in values if v):
                _replace_uids(dset, tag, elem, uid_map)
        elif vr in _ALWAYS_EMPTY_VRS:
            _empty(dset, tag, vr)
        elif strict and vr in _TEXT_VRS:
            _dummy(dset, tag, vr)


def _load_deferred(dset: Dataset) -> None:
    for tag in list(dset.keys()):
        raw = dset.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            dset[tag]  # noqa: B018 - reads the deferred value from the source file


def _clean_sequence(dset: Dataset, tag: BaseTag, uid_map: MutableMapping[str, str], *, strict: bool) -> None:
    try:
        items = dset[tag].value
    except Exception:
        del dset[tag]  # a sequence pydicom cannot parse cannot be checked: drop it
        return
    for item in items or []:
        _clean_dataset(item, uid_map, strict=strict)


def _add_deidentification_record(out: Dataset) -> None:
    out.PatientIdentityRemoved = "YES"
    ours = [
        f"PS3.15 E.1 Basic Profile (retinagen {__version__})",
        "all private attributes removed",
        "all PN, AS, DA, DT, TM values emptied",
        "UIDs replaced by 2.25 UUID UIDs",
    ]
    previous: list[str] = []
    if "DeidentificationMethod" in out:
        value = out.DeidentificationMethod
        previous = [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]
    out.DeidentificationMethod = [v for v in previous if v] + ours

    codes = list(out.get("DeidentificationMethodCodeSequence", None) or [])
    value, scheme, meaning = DEIDENTIFICATION_CODE
    if not any(
        str(c.get("CodeValue", "")) == value and str(c.get("CodingSchemeDesignator", "")) == scheme
        for c in codes
    ):
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = scheme
        item.CodeMeaning = meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    out.LongitudinalTemporalInformationModified = "REMOVED"


def _clean_file_meta(meta: Dataset, out: Dataset, uid_map: MutableMapping[str, str]) -> FileMetaDataset:
    clean = FileMetaDataset()
    for keyword in _META_KEEP:
        if keyword in meta:
            clean[keyword] = copy.deepcopy(meta[keyword])
    if "MediaStorageSOPClassUID" not in clean and "SOPClassUID" in out:
        clean.MediaStorageSOPClassUID = out.SOPClassUID
    old_instance = _raw_text(meta, 0x00020003)
    if old_instance:
        clean.MediaStorageSOPInstanceUID = _map_uid(old_instance, uid_map)
    elif "SOPInstanceUID" in out:
        clean.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return clean
