"""Every request and answer of the HTTP side (``utils/serving/web.py``) as a pydantic model: the
forms it reads, the JSON it answers, its error. FastAPI validates the requests against them
(a field that does not fit answers 422 naming it) and writes ``/api/v1/openapi.json`` from them.

A new form field is one line in its form model; a new endpoint's answer is a model here.
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field

from utils.inference.tiling import MIN_SIDE
from utils.scoring import FUSIONS, STRATEGIES

__all__ = ["Finite", "Uploads", "TileSide", "Error", "Info", "ScoringForm", "JobForm", "JobCreated",
           "Result", "Skipped", "Calibration", "JobScoring", "ProfileSummary", "JobStatus",
           "Cancelled", "MapData", "PredictForm", "RunLengths", "ImageAnswer", "PredictAnswer",
           "ProfileForm", "ProfileDeleted"]


Finite = Annotated[float, AllowInfNan(False)]  # nan and inf are refused


def _files_only(value):
    """A form's empty file input arrives as an empty string: it is no file, not an error."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if v != ""]


Uploads = Annotated[list[UploadFile], BeforeValidator(_files_only)]


def _tile_side(value: int | None) -> int | None:
    if value is not None and value != 0 and value < MIN_SIDE:
        raise ValueError(f"expected 0 (whole images) or a tile side of at least {MIN_SIDE} "
                         f"pixels, got {value}")
    return value


# a form's empty number input arrives as an empty string: absent, the default
TileSide = Annotated[int | None, BeforeValidator(lambda v: None if v == "" else v),
                     AfterValidator(_tile_side)]
TILE = (f"cut each image into square tiles of this many pixels of the original image (an integer "
        f"of at least {MIN_SIDE}; docs/predict.md, \"High-resolution images\"); 0: whole images; "
        "absent: the default (the profile's tile, else the server's --tile, else whole images)")


class Error(BaseModel):
    """Every refusal: 400 bad input, 401 token, 403 host or origin, 404 not yours or no such
    thing, 410 expired or deleted, 413 over a limit, 422 a field that does not fit (named)."""

    error: str = Field(description="one line, naming the field, file or limit; never a path")


class Info(BaseModel):
    model: str = Field(description="the model and scoring (a checkpoint by its file name)")
    threshold: float = Field(description="the server's T, the slider's first position")
    folders: bool = Field(description="whether the server shares folders (--allow_folder)")
    scoring: str = Field(description="the server's scoring, a job's default")
    profiles: bool = Field(description="whether the server keeps product profiles")
    max_files: int
    max_request_bytes: int


# ---- a job's own scoring -----------------------------------------------------------------------
class ScoringForm(BaseModel):
    """A job's own scoring, each field defaulting to the server's (its flags): normal reference
    images (uploaded and/or a shared folder), the strategy, the fusion rule and the coreset. An
    unknown field is refused (422), not ignored."""

    model_config = ConfigDict(extra="forbid")

    references: Uploads = Field([], description="normal images of the product: reference "
                                "scoring against their patches")
    references_folder: str = Field("", description="normal images in a shared folder")
    scoring: Literal[tuple(STRATEGIES)] | None = Field(  # type: ignore[valid-type]
        None, description="default: reference with references, else the server's")
    fusion: Literal[FUSIONS] | None = Field(  # type: ignore[valid-type]
        None, description="how the reference map joins the zero-shot maps; default the "
        "server's")
    coreset: Finite | None = Field(None, gt=0.0, le=1.0, description="keep this fraction of the "
                                   "reference memory (greedy coreset); default the server's")
    tile: TileSide = Field(None, description=TILE)


# ---- the page's jobs ---------------------------------------------------------------------------
class JobForm(ScoringForm):
    """A job of the page: images to inspect, or normal (and defective) images to calibrate T on;
    each group as uploaded files and/or a folder the server shares; scored by the server's
    scoring, the job's own or a product profile's."""

    kind: Literal["inspect", "calibrate"]
    images: Uploads = []
    images_folder: str = Field("", description="a shared folder (absolute, or relative to the "
                               "first shared one)")
    normal: Uploads = []
    normal_folder: str = ""
    defective: Uploads = []
    defective_folder: str = ""
    false_alarm_rate: Finite = Field(0.01, ge=0.0, lt=1.0, description="calibrate: the share "
                                     "of normal images allowed above T")
    profile: str | None = Field(None, description="a product profile's references and scoring "
                                "(not with the fields above)")


class JobCreated(BaseModel):
    job: str = Field(description="the job's id, private to the client (its cookie)")


class Result(BaseModel):
    index: int = Field(description="the image's place in the job's list")
    name: str = Field(description="as uploaded (a shared folder's images: folder/name)")
    image_score: float
    max_pixel_score: float


class Skipped(BaseModel):
    name: str
    reason: str


class Calibration(BaseModel):
    threshold: float
    false_alarm_rate: float = Field(description="the rate asked for")
    normal_alarm_rate: float = Field(description="the normal images' share above T")
    recall: float | None = Field(description="the defective images' share above T; null "
                                 "without defective images")
    normal_scores: list[float]
    defective_scores: list[float]


class JobScoring(BaseModel):
    """A job's own scoring (null in a job's status: the server's)."""

    scoring: str
    fusion: str
    references: int = Field(description="normal reference images")
    profile: str | None = Field(description="the product profile they come from")


class ProfileSummary(BaseModel):
    """A product profile as listed."""

    name: str
    made: str = Field(description="when it was written, ISO 8601 UTC")
    references: int = Field(description="its normal reference images")
    reference_names: list[str] = Field(description="as they were given")
    threshold: float | None = Field(description="its T; null: the server's")
    scoring: str
    fusion: str
    tile: int | None = Field(description="its jobs' tile side in pixels (a job's own tile "
                             "comes first); null: the server's default")
    options: dict[str, float | list[int]] = Field(description="the scoring's options")


class JobStatus(BaseModel):
    id: str
    kind: Literal["inspect", "calibrate", "profile"]
    state: Literal["queued", "running", "finished", "cancelled"]
    total: int
    done: int
    finished: bool
    position: int | None = Field(description="jobs that run before this one (queued only)")
    error: str | None
    results: list[Result] = Field(description="from ?since= on")
    result_count: int
    skipped: list[Skipped] = Field(description="from ?skipped_since= on")
    skipped_count: int
    calibration: Calibration | None
    tile: int | None = Field(description="the side in pixels of the tiles it runs with; null: "
                             "whole images")
    scoring: JobScoring | None = Field(description="the job's own scoring; null: the server's")
    profile: ProfileSummary | None = Field(description="the profile it used")


class Cancelled(BaseModel):
    job: str
    state: Literal["cancelled", "cancelling", "deleted"]


class MapData(BaseModel):
    width: int
    height: int
    data: str = Field(description="the heat map, float32 little-endian row by row, base64")


# ---- the line's API ----------------------------------------------------------------------------
class PredictForm(ScoringForm):
    images: Uploads = Field(description="the images, in the order of the answer")
    threshold: Finite | None = Field(None, description="T; default the profile's, else the "
                                     "server's")
    mask: Literal["none", "png", "rle"] = "none"
    profile: str | None = Field(None, description="a product profile's references, scoring and "
                                "T (or ?profile=)")


class RunLengths(BaseModel):
    size: list[int] = Field(description="[H, W]")
    counts: list[int] = Field(description="run lengths row by row, starting with a run of 0s")


class ImageAnswer(BaseModel):
    """One image's answer: its scores and verdict, or why it was skipped."""

    name: str
    image_score: float | None = Field(None, description="mean of the 2000 largest pixels of "
                                      "each branch, added (0 to 2)")
    max_pixel_score: float | None = None
    verdict: Literal["OK", "NG"] | None = Field(None, description="NG when max_pixel_score > "
                                                "threshold")
    mask: str | RunLengths | None = Field(None, description="mask=png: the 0/255 mask of map > "
                                          "T as base64 PNG; mask=rle: its run lengths")
    skipped: str | None = Field(None, description="why the file could not be read")


class PredictAnswer(BaseModel):
    threshold: float
    profile: str | None = Field(None, description="the product profile used")
    tile: int | None = Field(None, description="the side in pixels of the tiles the images were "
                             "cut into; absent: whole images")
    images: list[ImageAnswer] = Field(description="one per image, in input order")


# ---- product profiles --------------------------------------------------------------------------
class ProfileForm(ScoringForm):
    """A product profile: its normal reference images, scoring, T and tile, created or
    replaced (its ``tile``: that of the jobs that name it)."""

    threshold: Finite | None = Field(None, description="its T; default none (the server's)")


class ProfileDeleted(BaseModel):
    profile: str
    state: Literal["deleted"]
