"""Tests of the edgeota package itself: the root CLI, the embedded broker, the demo and the fleet simulator."""
