"""The choreography kit: events, topology, broker, runner; knows no service."""
