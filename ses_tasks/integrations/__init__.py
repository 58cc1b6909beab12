"""Web framework integrations, imported by path so their framework stays optional:

* ``ses_tasks.integrations.django.EmailBackend``: Django ``EMAIL_BACKEND`` (extra ``[django]``).
* ``ses_tasks.integrations.flask.SesTasksFlask``: Flask extension (extra ``[flask]``).
"""
