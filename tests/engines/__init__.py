"""Real container engines for the tests: podman (its settings, a runner, its Docker API service),
the project's image built from a local base, and (helper modules beside these) a network
namespace and a local AWS Batch. Nothing here is mocked; every process is started and stopped by
its own process id."""
