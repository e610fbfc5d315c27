"""A cell as a SageMaker training job: plan it (job), submit and follow it (submit), run it in
the container (entry), read its end (outcome), check requests (service_model). No torch."""
