"""PyTorch models: ranking (CTR), sequential and graph / collaborative filtering."""
