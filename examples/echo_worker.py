"""The seed's quick-start worker: ``powerhose echo_worker.echo`` in this directory."""


def echo(job):
    return job.data
