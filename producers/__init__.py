"""What an institution touches to get data in: the publisher SDK, and the traffic simulator."""
