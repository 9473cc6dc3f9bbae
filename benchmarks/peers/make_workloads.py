"""Writes the workload files of the engine benchmarks (format: _common.py) into workloads/.

    python benchmarks/peers/make_workloads.py

chat-64x128   64 varied chat requests x 128 output tokens (batch throughput)
prefix-64x64  64 requests sharing one ~500-token system prompt, each with its own short
              question, x 64 output tokens (prefix caching matters)
chat-1x256    1 chat request x 256 output tokens (single-request latency, ms/token)
All greedy, ignore_eos (every request yields exactly max_tokens), bf16. Standard library only.
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "workloads"

PROMPTS = [
    "What is the capital of France?", "Write a haiku about a herd of goats.",
    "Explain in two sentences why the sky is blue.", "List three uses for a paperclip.",
    "What is 17 times 23?", "Give me a short tip for learning to cook.",
    "Translate 'good morning' into Spanish and German.", "Describe a llama to a child in one paragraph.",
    "How do vaccines train the immune system?", "Write a limerick about a sleepy cat.",
    "What are the main differences between a virus and a bacterium?",
    "Suggest a name for a bakery that sells only bread.", "Why do leaves change colour in autumn?",
    "Explain what a hash table is to a new programmer.", "What should I pack for a weekend hike?",
    "Summarise the plot of Romeo and Juliet in three sentences.", "How does a bicycle stay upright?",
    "Write a polite email declining a meeting invitation.", "What is photosynthesis?",
    "Give me five words that rhyme with 'light'.", "How many legs does a spider have, and why?",
    "What is the difference between weather and climate?", "Write a two-line poem about the sea.",
    "Explain recursion with a simple example.", "What are some good habits for better sleep?",
    "Why is the ocean salty?", "Describe the taste of a lemon to someone who has never had one.",
    "How do I convert Celsius to Fahrenheit?", "What causes thunder?",
    "Write a short motivational message for a student before an exam.",
    "What is the tallest mountain in the world?", "Explain the rules of tic-tac-toe.",
    "What is the purpose of a museum?", "Give three tips for saving money on groceries.",
    "How do bees make honey?", "Write a tweet announcing a new coffee shop.",
    "What is gravity?", "Explain how a rainbow forms.", "What are prime numbers? Give examples.",
    "Describe your ideal weekend in a few sentences.", "How do airplanes fly?",
    "What is the difference between a list and a tuple in Python?",
    "Write a short story opening about a lighthouse keeper.", "Why do we have seasons?",
    "What is a balanced diet?", "How does a refrigerator keep food cold?",
    "Name three famous painters and one work by each.", "What does a software engineer do?",
    "Explain supply and demand in simple terms.", "How can I improve my handwriting?",
    "What is the boiling point of water at sea level?", "Write a riddle and give its answer.",
    "How do magnets work?", "What are the planets of the solar system?",
    "Give advice to someone starting to run.", "Why do cats purr?",
    "Explain what an API is using a restaurant analogy.", "What is the water cycle?",
    "Write a thank-you note to a neighbour who watered my plants.",
    "How is paper made?", "What are three benefits of learning a second language?",
    "Describe a sunset over the desert.", "What is the speed of light?",
    "Explain the difference between 'affect' and 'effect'.",
]

SYSTEM = (
    "You are Pasture, the customer support assistant of Meadowline Outdoor Supply, a shop that "
    "sells tents, sleeping bags, backpacks, stoves, water filters, clothing and footwear for "
    "hiking and camping. Follow these rules in every answer. "
    "1. Be friendly, brief and concrete; answer in at most five sentences unless the customer "
    "asks for detail. Never invent products, prices or policies that are not written here. "
    "2. Shipping: orders over 60 euros ship free within the country; smaller orders cost 4.90 "
    "euros. Standard delivery takes two to four working days; express delivery costs 9.90 euros "
    "and arrives the next working day when ordered before 2 pm. We ship to all countries of the "
    "European Union, Switzerland, Norway and the United Kingdom; customs fees for Switzerland, "
    "Norway and the United Kingdom are paid by the customer. "
    "3. Returns: unused items may be returned within 30 days of delivery for a full refund; the "
    "return label is free. Used tents and sleeping bags cannot be returned for hygiene and "
    "safety reasons unless they are faulty. Refunds reach the original payment method within "
    "five working days after the return arrives at our warehouse in Lyon. "
    "4. Warranty: all tents, backpacks and stoves carry a two-year warranty against defects in "
    "materials and workmanship; footwear and clothing carry one year. Damage from misuse, fire, "
    "animals or normal wear is not covered. For a warranty claim, ask the customer for the order "
    "number, a photo of the defect and a short description, and tell them a technician replies "
    "within three working days. "
    "5. Repairs: we repair tent poles, zips and small fabric tears at cost price; a typical zip "
    "repair costs 25 euros and takes two weeks. "
    "6. Stock and sizes: if the customer asks about stock, say you cannot see live stock and "
    "point them to the product page, which is updated every ten minutes. For boots, advise "
    "choosing half a size larger than street shoes and trying them on in the afternoon. "
    "7. Safety: never give advice that puts someone at risk. Stoves must never be used inside a "
    "closed tent because of carbon monoxide. For medical emergencies in the mountains, tell the "
    "customer to call 112. Water filters remove bacteria and protozoa but not viruses or "
    "chemicals; for viruses, recommend boiling water for one minute. "
    "8. Loyalty programme: members earn one point per euro spent and get five euros off for "
    "every 100 points; membership is free and can be joined on the account page. "
    "9. Opening hours of the shop in Lyon: Monday to Saturday, 9 am to 7 pm; closed on Sundays "
    "and public holidays. Phone support is open on weekdays from 9 am to 5 pm. "
    "10. If you do not know an answer, say so and offer to pass the question to a human "
    "colleague by email at help@meadowline.example, who replies within one working day."
)

QUESTIONS = [
    "How much is shipping for a 45 euro order?", "Can I return a tent I slept in once?",
    "Do you ship to Norway?", "How long does express delivery take?",
    "My stove stopped working after a year. Is it covered?", "What size hiking boots should I buy?",
    "Can I cook inside my tent when it rains?", "Does your water filter remove viruses?",
    "How do I join the loyalty programme?", "When is the Lyon shop open on Saturday?",
    "How much does a zip repair cost?", "How long until I get my refund?",
    "Is the return label free?", "Do I pay customs to the UK?",
    "My backpack strap tore after three months. What do I do?", "Is there phone support on Sunday?",
    "Do you have the blue sleeping bag in stock?", "How many points do I get for 250 euros?",
    "Can you repair a broken tent pole?", "My dog chewed my tent. Is that covered by warranty?",
    "How long is the warranty on jackets?", "Can I get next-day delivery if I order at 4 pm?",
    "Do you ship to Canada?", "What do you need for a warranty claim?",
    "Is shipping free for a 60 euro order?", "Can I return unused boots after 20 days?",
    "How quickly does a technician reply to a claim?", "Where is your warehouse?",
    "How do I make stream water safe to drink?", "Someone fell and hurt their leg on a trail. What now?",
    "Can I return socks I wore once?", "Are you open on public holidays?",
    "How much does express delivery cost?", "How do I reach a human colleague?",
    "What does the loyalty discount give me?", "Can I return a faulty sleeping bag I used?",
    "How long does standard delivery take?", "Do you sell kayaks?",
    "Does the warranty cover fire damage?", "What time does phone support close?",
    "Should I try boots on in the morning?", "Is membership in the loyalty programme free?",
    "Do you ship to Switzerland?", "How long does a zip repair take?",
    "My order number is 1234 and the stove leaks. Help?", "Can I pay customs in advance for Norway?",
    "What is your cheapest tent?", "How often is the product page stock updated?",
    "Is my one-year-old rain jacket still under warranty?", "Can I use a stove in the tent porch with the door shut?",
    "How many days do I have to return an item?", "Do you repair boots?",
    "What happens if I do not know my order number?", "Do water filters remove chemicals?",
    "How do I get five euros off?", "Can I pick up my order in Lyon?",
    "Is the warranty on backpacks two years?", "What is the emergency number in the mountains?",
    "Can I exchange a tent for a larger one?", "Do you deliver on weekends?",
    "What is the email for help?", "Do used tents with a defect qualify for return?",
    "How long should I boil water to kill viruses?", "Is shipping free for 59 euros?",
]

CHAT_1 = "Tell me a story about a llama who learns to fly, with a beginning, a middle and an end."


def workload(name, requests, max_tokens):
    return {"name": name, "requests": requests, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "dtype": "bfloat16"}


def user(text):
    return {"messages": [{"role": "user", "content": text}]}


def main():
    assert len(PROMPTS) == 64 and len(QUESTIONS) == 64
    files = {
        "chat-64x128": workload("chat-64x128", [user(p) for p in PROMPTS], 128),
        "prefix-64x64": workload("prefix-64x64", [
            {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]}
            for q in QUESTIONS], 64),
        "chat-1x256": workload("chat-1x256", [user(CHAT_1)], 256),
    }
    OUT.mkdir(exist_ok=True)
    for name, w in files.items():
        (OUT / f"{name}.json").write_text(json.dumps(w, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {OUT / name}.json ({len(w['requests'])} requests x {w['max_tokens']} tokens)")


if __name__ == "__main__":
    main()
