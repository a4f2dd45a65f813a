"""`python -m service.evaluate`: a trained model's top-1/top-5 error on the validation shards."""
