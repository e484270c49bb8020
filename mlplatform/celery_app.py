"""The Celery app the distributed profile's workers run (``celery --app mlplatform.celery_app
worker``): dagster-celery's tasks on the broker and result backend of the environment
(MLPLATFORM_CELERY_BROKER, MLPLATFORM_CELERY_BACKEND: redis:// URLs with the ACL user's password,
set by ``mlplatform cluster``). Built as ``dagster_celery.app`` builds its app, with the same
arguments the executor's side uses (``definitions.executor_of``), so both ends agree on queues and
routes; a worker needs only this environment, the repository and the services."""

import os

from dagster_celery.config import DEFAULT_CONFIG, dict_wrapper
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from mlplatform.settings import CELERY_BACKEND, CELERY_BROKER

app = make_app({"broker": os.environ[CELERY_BROKER], "backend": os.environ[CELERY_BACKEND], "include": [],
                "config_source": dict_wrapper(DEFAULT_CONFIG)})
execute_plan = create_task(app)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
