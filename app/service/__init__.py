"""The service core: tasks, builds, the encoder queue, classification (called by the HTTP layer)."""

from .core import BuildStatus, TaskService
from .errors import ServiceError
from .requests import ClassSpec, CreateTaskRequest, ShotsRequest, UploadedImage
from .task import Prediction, Task

__all__ = [
    "BuildStatus",
    "ClassSpec",
    "CreateTaskRequest",
    "Prediction",
    "ServiceError",
    "ShotsRequest",
    "Task",
    "TaskService",
    "UploadedImage",
]
