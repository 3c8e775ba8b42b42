"""Jobs: train, study, evaluate, explain and import-urls as queued units of work.

The catalog's ``jobs`` table is each job's record, whoever runs it. With no broker configured the service
runs jobs in one local worker process whose queue is that table (a restart resumes it); with a broker URL,
Celery 5 workers on RabbitMQ or Redis run them (``handlens worker``), acknowledging a job only when it ends,
so a worker killed mid-run has its job delivered again, and the job resumes its run.
"""

from handlens.jobs.api import JobInfo, cancel_job, get_job, list_jobs, submit_job
from handlens.jobs.specs import JOB_KINDS

__all__ = ["JOB_KINDS", "JobInfo", "cancel_job", "get_job", "list_jobs", "submit_job"]
