"""The service core: tasks, builds, the encoder queue, classification (called by the HTTP layer)."""

from cache_models import METHODS

from .core import Classification, TaskListing, TaskService
from .registry import BuildStatus, TaskRegistry
from .requests import AddShotsRequest, ClassifyRequest, CreateTaskRequest, UpdateTaskRequest, UploadedImage
from .task import AutoSelection, Prediction, Task

__all__ = [
    "METHODS",
    "AddShotsRequest",
    "AutoSelection",
    "BuildStatus",
    "Classification",
    "ClassifyRequest",
    "CreateTaskRequest",
    "Prediction",
    "Task",
    "TaskListing",
    "TaskRegistry",
    "TaskService",
    "UpdateTaskRequest",
    "UploadedImage",
]
