"""The order's business rules, which import nothing but the events.

- `order.py`: what a valid order is, the event that places it, and its states.
- `fanout.py`: which subscribers answered an order's OrderPlaced, and which are late.
- `timeline.py`: the order's steps across the services, in time order.
- `views.py`: the order as the API and the CLI show it.
"""
