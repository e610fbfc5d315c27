"""A local AWS for offline tests: moto in server mode and a SageMaker training emulator."""

from tests.aws.endpoint import LocalAWS
from tests.aws.training import TrainingJob, TrainingService

__all__ = ["LocalAWS", "TrainingJob", "TrainingService"]
