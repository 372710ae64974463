"""Jobs: the esriJob* lifecycle, the LMDB job store and the runner that calls export() / estimate()."""
from tilecrate.jobs.model import Job
from tilecrate.jobs.runner import JobError, JobRunner, JobService
from tilecrate.jobs.store import AdmissionRefused, JobStore

__all__ = ["AdmissionRefused", "Job", "JobError", "JobRunner", "JobService", "JobStore"]
