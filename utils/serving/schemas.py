"""Every request and answer of the HTTP side (``utils/serving/web.py``) as a pydantic model: the
forms it reads, the JSON it answers, its error. FastAPI validates the requests against them
(a field that does not fit answers 422 naming it) and writes ``/api/v1/openapi.json`` from them.

A new form field is one line in its form model; a new endpoint's answer is a model here.
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import AllowInfNan, BaseModel, BeforeValidator, Field

__all__ = ["Finite", "Uploads", "Error", "Info", "JobForm", "JobCreated", "Result", "Skipped",
           "Calibration", "JobStatus", "Cancelled", "MapData", "PredictForm", "RunLengths",
           "ImageAnswer", "PredictAnswer"]


Finite = Annotated[float, AllowInfNan(False)]  # nan and inf are refused


def _files_only(value):
    """A form's empty file input arrives as an empty string: it is no file, not an error."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if v != ""]


Uploads = Annotated[list[UploadFile], BeforeValidator(_files_only)]


class Error(BaseModel):
    """Every refusal: 400 bad input, 401 token, 403 host or origin, 404 not yours or no such
    thing, 410 expired or deleted, 413 over a limit, 422 a field that does not fit (named)."""

    error: str = Field(description="one line, naming the field, file or limit; never a path")


class Info(BaseModel):
    model: str = Field(description="the model and scoring (a checkpoint by its file name)")
    threshold: float = Field(description="the server's T, the slider's first position")
    folders: bool = Field(description="whether the server shares folders (--allow_folder)")
    max_files: int
    max_request_bytes: int


# ---- the page's jobs ---------------------------------------------------------------------------
class JobForm(BaseModel):
    """A job of the page: images to inspect, or normal (and defective) images to calibrate T on;
    each group as uploaded files and/or a folder the server shares."""

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


class JobStatus(BaseModel):
    id: str
    kind: Literal["inspect", "calibrate"]
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


class Cancelled(BaseModel):
    job: str
    state: Literal["cancelled", "cancelling", "deleted"]


class MapData(BaseModel):
    width: int
    height: int
    data: str = Field(description="the heat map, float32 little-endian row by row, base64")


# ---- the line's API ----------------------------------------------------------------------------
class PredictForm(BaseModel):
    images: Uploads = Field(description="the images, in the order of the answer")
    threshold: Finite | None = Field(None, description="T; default the server's")
    mask: Literal["none", "png", "rle"] = "none"


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
    images: list[ImageAnswer] = Field(description="one per image, in input order")
